"""FlexAttention backend: torch's templated attention kernel with a BlockMask from lo/hi.

Legend: T = tokens, Hq / Hkv = query / key-value heads, D = head dim, B = block size
(tile side), nQ = nK = ceil(T / B) tiles per side.

The BlockMask is built directly from the column intervals, as the CUDA kernel classifies
its tiles (DESIGN §4): for a query tile [qs, qe) and a key tile with per-tile min/max of lo
and hi, the tile is

    skipped  if max(hi) <= qs or min(lo) >= qe     (no key visible to any of its queries)
    full     if max(lo) <= qs and min(hi) >= qe    (every key visible to every query)
    partial  otherwise                             (mask_mod decides per element)

This costs O(T + nQ * nK) and never materialises the [T, T] mask that
``create_block_mask`` evaluates. Tiles cut by the end of the sequence are never full (as in
``create_block_mask``), so T need not be a multiple of B. The classification is
conservative: a partial tile may turn out empty, never the reverse.

On CUDA ``flex_attention`` is compiled (``dynamic=False``: micro-batches have a static
token budget, and a new mask_mod closure over new lo/hi tensors does not recompile). On
CPU it runs uncompiled, forward only: torch has no CPU backward for FlexAttention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from modus_mega.ops.attention import AttentionBackend, check_qkv
from modus_mega.ops.mask import check_lo_hi

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's default sparse block size


def lo_hi_mask_mod(lo: Tensor, hi: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention ``mask_mod`` of the column intervals: key kv is visible iff lo <= q < hi."""

    def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (lo[kv_idx] <= q_idx) & (q_idx < hi[kv_idx])

    return mask_mod


def classify_tiles(lo: Tensor, hi: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Classify the query x key tiles of a [T, T] mask from per-key-tile min/max of lo and hi.

    Returns:
        ``partial, full``: bool [nQ, nK]; a tile in neither is skipped (module docstring).
    """
    num_tokens = check_lo_hi(lo, hi)
    num_blocks = -(-num_tokens // block_size)
    pad = num_blocks * block_size - num_tokens
    int32 = torch.iinfo(torch.int32)

    def per_tile(values: Tensor, pad_value: int) -> Tensor:  # [T] -> [nK, B]
        return torch.cat([values, values.new_full((pad,), pad_value)]).view(num_blocks, block_size)

    # Pad values are neutral for the reduction they feed; every tile holds >= 1 real key.
    lo_min = per_tile(lo, int32.max).amin(dim=1)  # [nK]
    lo_max = per_tile(lo, int32.min).amax(dim=1)
    hi_min = per_tile(hi, int32.max).amin(dim=1)
    hi_max = per_tile(hi, int32.min).amax(dim=1)

    tile_start = torch.arange(num_blocks, device=lo.device) * block_size  # [nQ]
    tile_end = (tile_start + block_size).clamp_max(num_tokens)  # [nQ]
    whole = tile_end - tile_start == block_size  # [nQ]: tile not cut by the end of the sequence
    q_start, q_end = tile_start[:, None], tile_end[:, None]  # [nQ, 1]

    touched = (lo_min[None, :] < q_end) & (hi_max[None, :] > q_start)  # [nQ, nK]
    full = (
        (lo_max[None, :] <= q_start) & (hi_min[None, :] >= q_end) & whole[:, None] & whole[None, :]
    )
    return touched & ~full, full


def _ordered(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """BlockMask's sparse form of a bool [nQ, nK].

    Returns:
        Tile counts [1, 1, nQ] and key tile ids [1, 1, nQ, nK], the listed tiles first in order.
    """
    tiles = tiles.to(torch.int32)[None, None]
    counts = tiles.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_mask_from_lo_hi(
    lo: Tensor, hi: Tensor, block_size: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """The FlexAttention BlockMask of ``lo, hi`` (int32 [T]), on lo's device."""
    num_tokens = check_lo_hi(lo, hi)
    if num_tokens == 0:
        raise ValueError("FlexAttention needs at least one token; lo/hi are empty")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    partial, full = classify_tiles(lo, hi, block_size)
    partial_counts, partial_indices = _ordered(partial)
    full_counts, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=lo_hi_mask_mod(lo, hi),
        seq_lengths=(num_tokens, num_tokens),
    )


class FlexAttention(AttentionBackend):
    """Masked GQA attention through ``torch.nn.attention.flex_attention``."""

    name = "flex"

    def __init__(self, compiled: bool, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        """``compiled``: run the fused compiled kernel (CUDA); False runs the eager math
        path (CPU, forward only). ``block_size``: side of the sparse tiles."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.compiled = compiled
        self.block_size = block_size
        self._flex_attention = (
            torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        )

    def prepare(self, lo: Tensor, hi: Tensor) -> BlockMask:
        """Build the BlockMask of this micro-batch on lo's device (no host sync)."""
        return block_mask_from_lo_hi(lo, hi, self.block_size)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prepared: BlockMask, scale: float) -> Tensor:
        """[T, Hq, D] masked attention in q's dtype; see ``AttentionBackend.forward``."""
        check_qkv(q, k, v, prepared.seq_lengths[0])
        if prepared.kv_num_blocks.device != q.device:
            raise ValueError(
                f"the BlockMask is on {prepared.kv_num_blocks.device} but q is on {q.device}; "
                f"call prepare() with lo/hi on the activations' device"
            )
        if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
            if torch.is_grad_enabled():
                raise ValueError(
                    "FlexAttention has no CPU backward in torch; train on CPU with attention "
                    "backend 'reference' (or 'auto'), or call the flex backend under "
                    "torch.no_grad()"
                )
            # torch refuses CPU inputs that require grad even when no graph is recorded.
            q, k, v = q.detach(), k.detach(), v.detach()
        out = self._flex_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, T, D]
            k.transpose(0, 1).unsqueeze(0),  # [1, Hkv, T, D]
            v.transpose(0, 1).unsqueeze(0),
            block_mask=prepared,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # [1, Hq, T, D]
        return out.squeeze(0).transpose(0, 1).contiguous()
