"""The mixture-of-transformers decoder layer: two experts, one shared attention.

Shape legend: T tokens in the packed micro-batch, T_e tokens routed to expert e,
R rows of the residual stream this rank holds (T; under sequence parallelism T padded to
a multiple of tp, divided by tp), R_e those of expert e, D model width, Hq / Hkv local
query / key-value heads (divided by tp), Dh head_dim.

Each token is routed by its expert index (0: the 1D expert, BAGEL's "und" weights;
1: the 2D expert, BAGEL's ``*_moe_gen`` weights). Both experts' q/k/v meet in ONE
attention over the whole packed sequence, then each expert finishes its own tokens.

Each block (attention, MLP) normalises this rank's rows per expert, hands them to
``Collectives.project`` which runs the experts' column-parallel linears over all of
their tokens, and sums the experts' row-parallel outputs, merged back into sequence
order, with one ``Collectives.reduce``: serial, nothing; tensor parallel, one all-reduce;
sequence parallel, an all-gather before and a reduce-scatter after (``modus_mega/parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from modus_mega.config import LLMConfig
from modus_mega.model.inputs import expert_ids_of
from modus_mega.model.layers import SERIAL_COLLECTIVES, Collectives, LinearFactory, RMSNorm, SwiGLU, apply_rope, rope_cos_sin
from modus_mega.ops.attention import AttentionBackend

NUM_EXPERTS = 2
EXPERT_1D, EXPERT_2D = 0, 1


@dataclass
class ShardRows:
    """The rows of the residual stream one rank holds, and their routing.

    Without sequence parallelism that is the whole sequence. With it, T is padded to
    ``num_shards * size`` and rank r holds rows [r * size, (r + 1) * size): a contiguous run
    of the sequence; rows at or past T are padding, which no expert sees.
    """

    start: int  # position of the first row in the sequence
    size: int  # R
    expert_index: list[Tensor]  # per expert: LongTensor [R_e] of its rows' offsets from ``start``, ascending
    unpermute: Tensor  # LongTensor [R]: cat(per-expert rows, padding rows)[unpermute] restores row order

    @property
    def num_padding(self) -> int:
        """Padding rows among this rank's rows."""
        return self.size - sum(index.numel() for index in self.expert_index)

    @staticmethod
    def of(expert_ids: Tensor, num_shards: int, shard: int) -> "ShardRows":
        """Rank ``shard``'s rows of a sequence with expert ids [T], split into ``num_shards`` equal runs."""
        size = -(-expert_ids.numel() // num_shards)
        start = shard * size
        ids = expert_ids[start : start + size]  # shorter than ``size`` where the run ends in padding
        index, _ = LayerContext.route(ids)
        padding = torch.arange(ids.numel(), size, device=ids.device)
        return ShardRows(start, size, index, torch.argsort(torch.cat([*index, padding])))


class KeyValuePrefix(Protocol):
    """Keys and values that come BEFORE a forward's own tokens: a KV cache (``inference/kv_cache.py``).

    The queries of such a forward are the last rows of the keys (DESIGN §8); the attention
    metadata then describes all keys, cached ones first.
    """

    def extend(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``layer``'s cached keys and values followed by ``k``, ``v`` of this forward's tokens.

        k, v: [T, Hkv, Dh] (k after k_norm and RoPE) -> [T_cached + T, Hkv, Dh] each.
        """


@dataclass
class LayerContext:
    """Per-micro-batch state every layer reuses: routing, RoPE tables, attention metadata."""

    expert_index: list[Tensor]  # per expert: LongTensor [T_e] of its token positions, ascending
    unpermute: Tensor  # LongTensor [T]: cat(per-expert rows)[unpermute] restores sequence order
    cos: Tensor  # [T, Dh]
    sin: Tensor  # [T, Dh]
    attention: AttentionBackend
    attention_mask: Any  # what attention.prepare(lo, hi) returned
    shard: ShardRows | None = None  # this rank's rows of the residual stream; None: the whole sequence
    prefix: KeyValuePrefix | None = None  # cached keys/values before these tokens (generation); None: training

    def __post_init__(self) -> None:
        if self.shard is None:
            self.shard = ShardRows(0, self.unpermute.numel(), self.expert_index, self.unpermute)

    @staticmethod
    def route(expert_ids: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per-expert token positions and the inverse permutation, from expert ids [T]."""
        index = [torch.nonzero(expert_ids == e, as_tuple=True)[0] for e in range(NUM_EXPERTS)]
        unpermute = torch.argsort(torch.cat(index))
        return index, unpermute

    @staticmethod
    def build(
        cfg: LLMConfig,
        token_type: Tensor,
        position_ids: Tensor,
        attn_lo: Tensor,
        attn_hi: Tensor,
        dtype: torch.dtype,
        attention: AttentionBackend,
        collectives: Collectives = SERIAL_COLLECTIVES,
        prefix: KeyValuePrefix | None = None,
    ) -> "LayerContext":
        """The context of one micro-batch from its integer metadata (all [T]); RoPE tables in ``dtype``.

        Only integer tensors are needed, so a pipeline stage rebuilds it from what travels
        with the hidden states. ``collectives`` says which rows of the residual stream this
        rank holds. With a ``prefix`` (a KV cache of T_c tokens), ``attn_lo`` / ``attn_hi``
        describe all T_c + T keys and the T tokens are the queries at positions T_c onwards.
        """
        expert_ids = expert_ids_of(token_type)
        expert_index, unpermute = LayerContext.route(expert_ids)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, dtype)
        num_shards = collectives.num_shards
        if prefix is None:
            attention_mask = attention.prepare(attn_lo, attn_hi)
        else:
            attention_mask = attention.prepare(attn_lo, attn_hi, attn_lo.numel() - token_type.numel())
        return LayerContext(
            expert_index=expert_index,
            unpermute=unpermute,
            cos=cos,
            sin=sin,
            attention=attention,
            attention_mask=attention_mask,
            shard=ShardRows.of(expert_ids, num_shards, collectives.shard) if num_shards > 1 else None,
            prefix=prefix,
        )


class MoTExpert(nn.Module):
    """One expert's weights in one layer (names follow BAGEL's, minus the ``_moe_gen`` suffix)."""

    def __init__(self, cfg: LLMConfig, linears: LinearFactory) -> None:
        super().__init__()
        d, dh = cfg.hidden_size, cfg.head_dim
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = linears.column(d, cfg.num_heads * dh, cfg.qkv_bias)
        self.k_proj = linears.column(d, cfg.num_kv_heads * dh, cfg.qkv_bias)
        self.v_proj = linears.column(d, cfg.num_kv_heads * dh, cfg.qkv_bias)
        self.o_proj = linears.row(cfg.num_heads * dh, d, cfg.o_bias)
        self.q_norm = RMSNorm(dh, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dh, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.intermediate_size, linears)


class MoTLayer(nn.Module):
    """Pre-norm decoder layer; both experts run every step, even on zero tokens."""

    def __init__(self, cfg: LLMConfig, linears: LinearFactory) -> None:
        super().__init__()
        self.experts = nn.ModuleList(MoTExpert(cfg, linears) for _ in range(NUM_EXPERTS))
        self.collectives = linears.collectives
        self.num_heads = cfg.num_heads // linears.tp_size
        self.num_kv_heads = max(1, cfg.num_kv_heads // linears.tp_size)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.detach_1d_qkv = cfg.freeze_1d_expert

    def forward(self, x: Tensor, ctx: LayerContext) -> Tensor:
        """x [R, D] -> [R, D]: this rank's rows of the residual stream (``ctx.shard``)."""
        x = x + self._attention(self._norm(x, ctx, "input_layernorm"), ctx)
        return x + self._mlp(self._norm(x, ctx, "post_attention_layernorm"), ctx)

    def _norm(self, x: Tensor, ctx: LayerContext, name: str) -> list[Tensor]:
        """Per expert: its rows of x [R_e, D] through its own norm ``name``."""
        return [getattr(expert, name)(x.index_select(0, index)) for expert, index in zip(self.experts, ctx.shard.expert_index)]

    def _qkv(self, tokens: list[Tensor]) -> list[Tensor]:
        """[q, k, v] of expert 0 then of expert 1 ([T_e, local features]), from each expert's normed tokens."""
        return [
            proj(h) for expert, h in zip(self.experts, tokens) for proj in (expert.q_proj, expert.k_proj, expert.v_proj)
        ]  # fmt: skip

    def _attention(self, rows: list[Tensor], ctx: LayerContext) -> Tensor:
        """The attention block's output [R, D] for this rank's rows, from each expert's normed rows."""
        dh = self.head_dim
        projected = self.collectives.project(rows, ctx, self._qkv)
        qs, ks, vs = [], [], []
        for e, expert in enumerate(self.experts):
            q, k, v = projected[3 * e : 3 * e + 3]
            q = expert.q_norm(q.view(-1, self.num_heads, dh))  # [T_e, Hq, Dh]
            k = expert.k_norm(k.view(-1, self.num_kv_heads, dh))  # [T_e, Hkv, Dh]
            v = v.view(-1, self.num_kv_heads, dh)
            if e == EXPERT_1D and self.detach_1d_qkv:
                # BAGEL's freeze_und: no gradient reaches 2D weights of earlier layers through 1D tokens.
                q, k, v = q.detach(), k.detach(), v.detach()
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q = torch.cat(qs)[ctx.unpermute]  # [T, Hq, Dh] in sequence order
        k = torch.cat(ks)[ctx.unpermute]
        v = torch.cat(vs)[ctx.unpermute]
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if ctx.prefix is not None:  # generation: the cached keys come first, the queries are the last rows
            k, v = ctx.prefix.extend(self, k, v)
        attn = ctx.attention.forward(q, k, v, ctx.attention_mask, self.scale).flatten(1)  # [T, Hq*Dh]
        outs = [expert.o_proj(attn.index_select(0, index)) for expert, index in zip(self.experts, ctx.expert_index)]
        return self.collectives.reduce(torch.cat(outs)[ctx.unpermute], ctx)  # [T, D] partial sums -> [R, D]

    def _mlp(self, rows: list[Tensor], ctx: LayerContext) -> Tensor:
        """The MLP block's output [R, D] for this rank's rows, from each expert's normed rows."""
        outs = self.collectives.project(rows, ctx, lambda tokens: [e.mlp(h) for e, h in zip(self.experts, tokens)])
        return self.collectives.reduce(torch.cat(outs)[ctx.unpermute], ctx)
