"""The KV cache of one generation branch, and the forward of new tokens over it (DESIGN §8).

A cache holds, per decoder layer, the keys (after k_norm and RoPE at their position ids) and
the values of every token of the context so far: causal tokens (markers, text, generated 1D
tokens) and finished full splits (clean VAE, ViT). It also holds the context's layout (its
``(mode, length)`` runs, ``ops/mask.py``), from which the attention metadata of all keys is
rebuilt for each forward: one sample whose causal keys stay visible to every later token.

``forward_over_cache`` runs new tokens as the last query rows over the cached keys. With
``write=True`` their keys and values are appended (causal tokens, a finished full split);
with ``write=False`` the cache is read only (a noisy target split at every flow step, so
it is never cached and no later token ever sees it). New tokens must start where a cache
may end (``ops.mask.cache_boundaries``): a full split is appended whole, in one forward.

``forward_over_caches`` runs several requests (guidance branches, candidates) in ONE forward:
keys ``[cache 0][cache 1]...[new 0][new 1]...``, the new tokens as the query rows, each key's
column interval clipped to its own request's new rows (``packed_lo_hi``), so requests never
see each other. ``forward_over_cache`` is its one-request case.

The full-sequence forward of the same tokens is the oracle of this path: every output of a
cached forward equals the corresponding rows of the full forward (tests/inference).

Shapes: T_c cached tokens, T new tokens, Hkv local key-value heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modus_mega.model.inputs import ModelInputs
from modus_mega.model.modus import ModusModel, embed_inputs, output_heads
from modus_mega.model.mot import LayerContext
from modus_mega.ops.attention import AttentionBackend
from modus_mega.ops.mask import SplitMode, lo_hi_for_layout

Run = tuple[SplitMode, int]  # (attention mode, tokens) of one run of a layout


@dataclass
class KVCache:
    """One branch's cached context: per-layer keys and values, and the runs they came from."""

    runs: list[Run] = field(default_factory=list)  # the cached tokens' layout, in order
    layers: dict[nn.Module, tuple[Tensor, Tensor]] = field(default_factory=dict)  # layer -> (k, v) [T_c, Hkv, Dh]

    @property
    def num_tokens(self) -> int:
        """T_c, the cached tokens."""
        return sum(length for _, length in self.runs)

    def copy(self) -> "KVCache":
        """A cache sharing today's tensors; appending to either leaves the other as it is (tensors are never mutated)."""
        return KVCache(list(self.runs), dict(self.layers))

    def nbytes(self) -> int:
        """Bytes of the cached keys and values over all layers."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers.values())


@dataclass
class CachedRequest:
    """One request of a packed cached forward: new tokens to run after ``cache``'s context.

    ``inputs``: the T new tokens (their position ids already continue the context's;
    ``attn_lo`` / ``attn_hi`` are ignored, the mask comes from ``cache.runs + runs``).
    ``ce_index`` / ``mse_index`` index the new tokens. ``write``: append the new tokens (and
    their runs) to the cache.
    """

    cache: KVCache
    inputs: ModelInputs
    runs: list[Run]
    ce_index: Tensor  # [N_ce] long
    mse_index: Tensor  # [N_mse] long
    write: bool


@dataclass
class _PackedPrefix:
    """``model.mot.KeyValuePrefix`` over several caches: keys ``[cache 0][cache 1]...[new 0][new 1]...``.

    Each writing request's cache gets its own new rows appended (``bounds``: the new rows of
    each request among all new rows).
    """

    requests: list[CachedRequest]
    bounds: list[tuple[int, int]]

    def extend(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cached = [r.cache.layers[layer] for r in self.requests if layer in r.cache.layers]
        for request, (a, b) in zip(self.requests, self.bounds):
            if request.write:
                own = request.cache.layers.get(layer)
                new_k, new_v = k[a:b], v[a:b]
                request.cache.layers[layer] = (torch.cat([own[0], new_k]), torch.cat([own[1], new_v])) if own else (new_k, new_v)
        if not cached:
            return k, v
        return torch.cat([c[0] for c in cached] + [k]), torch.cat([c[1] for c in cached] + [v])


def packed_lo_hi(requests: list[tuple[list[Run], list[Run]]]) -> tuple[Tensor, Tensor]:
    """Column intervals [sum C_i + sum T_i] of several cached contexts run in one forward.

    ``requests``: per request, its cached runs (C_i tokens) and its new runs (T_i tokens).
    Keys are laid out ``[cache 0][cache 1]...[new 0][new 1]...`` and the new tokens are the
    query rows. Each key's interval of its own request (``lo_hi_for_layout`` of ``cached +
    new``) is clipped to that request's new rows and moved to where they sit, so a key is
    visible exactly to the rows its own request's full forward would show it to (DESIGN §4).
    """
    sizes = [(sum(n for _, n in cached), sum(n for _, n in new)) for cached, new in requests]
    cached_parts: list[tuple[Tensor, Tensor]] = []  # per request, its cached keys' (lo, hi)
    new_parts: list[tuple[Tensor, Tensor]] = []  # per request, its new keys' (lo, hi)
    new_start = sum(c for c, _ in sizes)
    for (cached, new), (c, t) in zip(requests, sizes):
        lo, hi = lo_hi_for_layout([cached + new])  # [C_i + T_i], local positions
        lo = lo.clamp(c, c + t) - c + new_start  # the request's own query rows, where they sit
        hi = hi.clamp(c, c + t) - c + new_start
        cached_parts.append((lo[:c], hi[:c]))
        new_parts.append((lo[c:], hi[c:]))
        new_start += t
    lo = torch.cat([p[0] for p in cached_parts + new_parts])
    hi = torch.cat([p[1] for p in cached_parts + new_parts])
    return lo.to(torch.int32), hi.to(torch.int32)


def concat_inputs(parts: list[ModelInputs]) -> ModelInputs:
    """The new tokens of several requests, one after another (``attn_lo`` / ``attn_hi`` left empty)."""
    lengths = torch.cat([p.vit_cu_seqlens[1:] - p.vit_cu_seqlens[:-1] for p in parts])  # [I_vit]
    return ModelInputs(
        input_ids=torch.cat([p.input_ids for p in parts]),
        token_type=torch.cat([p.token_type for p in parts]),
        position_ids=torch.cat([p.position_ids for p in parts]),
        attn_lo=torch.zeros(0, dtype=torch.int32), attn_hi=torch.zeros(0, dtype=torch.int32),
        vit_patches=torch.cat([p.vit_patches for p in parts]),
        vit_position_ids=torch.cat([p.vit_position_ids for p in parts]),
        vit_cu_seqlens=torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)),
        vae_tokens=torch.cat([p.vae_tokens for p in parts]),
        vae_timesteps=torch.cat([p.vae_timesteps for p in parts]),
        vae_position_ids=torch.cat([p.vae_position_ids for p in parts]),
    )  # fmt: skip


def forward_over_caches(
    model: ModusModel, attention: AttentionBackend, requests: list[CachedRequest]
) -> list[tuple[Tensor, Tensor]]:
    """Per request, logits [N_ce, V] and velocities [N_mse, P] of its new tokens, all run in ONE forward.

    Every request sees only its own cache and its own new tokens (``packed_lo_hi``), so each
    output equals ``forward_over_cache`` of that request alone up to fp32 summation order.
    Requests may share a cache object only if none of them writes.
    """
    for r in requests:
        num_new = r.inputs.token_type.numel()
        if sum(length for _, length in r.runs) != num_new:
            raise ValueError(f"the new runs {r.runs} describe {sum(n for _, n in r.runs)} tokens, the inputs {num_new}")
        if r.write and any(mode == "noise" for mode, _ in r.runs):
            raise ValueError("a noisy split is never written to the cache: run it with write=False")
    caches = [id(r.cache) for r in requests]
    if any(r.write and caches.count(id(r.cache)) > 1 for r in requests):
        raise ValueError("a cache that a request writes may not appear in another request of the same forward; copy() it")
    inputs = concat_inputs([r.inputs for r in requests])
    device = inputs.token_type.device
    lo, hi = packed_lo_hi([(r.cache.runs, r.runs) for r in requests])  # [sum C_i + sum T_i]
    ends = torch.tensor([r.inputs.token_type.numel() for r in requests]).cumsum(0).tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    ctx = LayerContext.build(
        model.cfg.llm, inputs.token_type, inputs.position_ids, lo.to(device), hi.to(device),
        model.embed_tokens.weight.dtype, attention, model.collectives, prefix=_PackedPrefix(requests, bounds),
    )  # fmt: skip
    hidden = model.decode(embed_inputs(model, inputs), ctx)
    ce_index = torch.cat([r.ce_index + a for r, (a, _) in zip(requests, bounds)])
    mse_index = torch.cat([r.mse_index + a for r, (a, _) in zip(requests, bounds)])
    logits, velocity = output_heads(model, hidden, ce_index, mse_index)
    for r in requests:
        if r.write:
            r.cache.runs.extend(r.runs)
    logits_per_request = logits.split([r.ce_index.numel() for r in requests])
    return list(zip(logits_per_request, velocity.split([r.mse_index.numel() for r in requests])))


def forward_over_cache(
    model: ModusModel,
    attention: AttentionBackend,
    cache: KVCache,
    inputs: ModelInputs,
    runs: list[Run],
    ce_index: Tensor,
    mse_index: Tensor,
    write: bool,
) -> tuple[Tensor, Tensor]:
    """Logits [N_ce, V] and velocities [N_mse, P] of new tokens run after ``cache``'s context.

    ``forward_over_caches`` of the one request (see ``CachedRequest`` for the arguments).
    """
    return forward_over_caches(model, attention, [CachedRequest(cache, inputs, runs, ce_index, mse_index, write)])[0]
