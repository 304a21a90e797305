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
class _Prefix:
    """``model.mot.KeyValuePrefix`` over a ``KVCache``: prepends its keys, appends the new ones if writing."""

    cache: KVCache
    write: bool

    def extend(self, layer: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cached = self.cache.layers.get(layer)
        if cached is not None:
            k, v = torch.cat([cached[0], k]), torch.cat([cached[1], v])
        if self.write:
            self.cache.layers[layer] = (k, v)
        return k, v


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

    ``inputs``: the T new tokens (their position ids already continue the context's);
    ``inputs.attn_lo`` / ``attn_hi`` are ignored, the mask comes from ``cache.runs + runs``
    (one sample). ``ce_index`` / ``mse_index`` index the new tokens. ``write``: append the new
    tokens to the cache (their runs too).
    """
    num_new = inputs.token_type.numel()
    if sum(length for _, length in runs) != num_new:
        raise ValueError(f"the new runs {runs} describe {sum(n for _, n in runs)} tokens, the inputs {num_new}")
    if write and any(mode == "noise" for mode, _ in runs):
        raise ValueError("a noisy split is never written to the cache: run it with write=False")
    lo, hi = lo_hi_for_layout([cache.runs + runs])  # [T_c + T] each
    ctx = LayerContext.build(
        model.cfg.llm, inputs.token_type, inputs.position_ids, lo.to(inputs.token_type.device),
        hi.to(inputs.token_type.device), model.embed_tokens.weight.dtype, attention, model.collectives,
        prefix=_Prefix(cache, write),
    )  # fmt: skip
    hidden = model.decode(embed_inputs(model, inputs), ctx)
    if write:
        cache.runs.extend(runs)
    return output_heads(model, hidden, ce_index, mse_index)
