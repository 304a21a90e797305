"""The mixture-of-transformers decoder layer: two experts, one shared attention.

Shape legend: T tokens in the packed micro-batch, T_e tokens routed to expert e,
D model width, Hq / Hkv local query / key-value heads (divided by tp), Dh head_dim.

Each token is routed by its expert index (0: the 1D expert, BAGEL's "und" weights;
1: the 2D expert, BAGEL's ``*_moe_gen`` weights). Both experts' q/k/v meet in ONE
attention over the whole packed sequence, then each expert finishes its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from modus_mega.config import LLMConfig
from modus_mega.model.inputs import expert_ids_of
from modus_mega.model.layers import LinearFactory, RMSNorm, SwiGLU, apply_rope, rope_cos_sin
from modus_mega.ops.attention import AttentionBackend

NUM_EXPERTS = 2
EXPERT_1D, EXPERT_2D = 0, 1


@dataclass
class LayerContext:
    """Per-micro-batch state every layer reuses: routing, RoPE tables, attention metadata."""

    expert_index: list[Tensor]  # per expert: LongTensor [T_e] of its token positions, ascending
    unpermute: Tensor  # LongTensor [T]: cat(per-expert rows)[unpermute] restores sequence order
    cos: Tensor  # [T, Dh]
    sin: Tensor  # [T, Dh]
    attention: AttentionBackend
    attention_mask: Any  # what attention.prepare(lo, hi) returned

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
    ) -> "LayerContext":
        """The context of one micro-batch from its integer metadata (all [T]); RoPE tables in ``dtype``.

        Only integer tensors are needed, so a pipeline stage rebuilds it from what travels
        with the hidden states.
        """
        expert_index, unpermute = LayerContext.route(expert_ids_of(token_type))
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, dtype)
        return LayerContext(
            expert_index=expert_index,
            unpermute=unpermute,
            cos=cos,
            sin=sin,
            attention=attention,
            attention_mask=attention.prepare(attn_lo, attn_hi),
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
        self.num_heads = cfg.num_heads // linears.tp_size
        self.num_kv_heads = max(1, cfg.num_kv_heads // linears.tp_size)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.detach_1d_qkv = cfg.freeze_1d_expert

    def forward(self, x: Tensor, ctx: LayerContext) -> Tensor:
        """x [T, D] -> [T, D]."""
        dh = self.head_dim
        residuals, qs, ks, vs = [], [], [], []
        for e, (expert, index) in enumerate(zip(self.experts, ctx.expert_index)):
            x_e = x.index_select(0, index)  # [T_e, D]
            h = expert.input_layernorm(x_e)
            q = expert.q_norm(expert.q_proj(h).view(-1, self.num_heads, dh))  # [T_e, Hq, Dh]
            k = expert.k_norm(expert.k_proj(h).view(-1, self.num_kv_heads, dh))  # [T_e, Hkv, Dh]
            v = expert.v_proj(h).view(-1, self.num_kv_heads, dh)
            if e == EXPERT_1D and self.detach_1d_qkv:
                # BAGEL's freeze_und: no gradient reaches 2D weights of earlier layers through 1D tokens.
                q, k, v = q.detach(), k.detach(), v.detach()
            residuals.append(x_e)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q = torch.cat(qs)[ctx.unpermute]  # [T, Hq, Dh] in sequence order
        k = torch.cat(ks)[ctx.unpermute]
        v = torch.cat(vs)[ctx.unpermute]
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        attn = ctx.attention.forward(q, k, v, ctx.attention_mask, self.scale).flatten(1)  # [T, Hq*Dh]

        outs = []
        for expert, index, x_e in zip(self.experts, ctx.expert_index, residuals):
            h = x_e + expert.o_proj(attn.index_select(0, index))
            outs.append(h + expert.mlp(expert.post_attention_layernorm(h)))
        return torch.cat(outs)[ctx.unpermute]
