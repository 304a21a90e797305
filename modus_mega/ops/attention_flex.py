"""FlexAttention backend: torch's templated attention kernel with a BlockMask from lo/hi.

Legend: T = tokens (keys), Tq = query rows (T unless over a cache), Hq / Hkv = query /
key-value heads, D = head dim, B = block size (tile side), nQ = ceil(Tq / B) and
nK = ceil(T / B) tiles per side.

The BlockMask is built directly from the column intervals, as the CUDA kernel classifies
its tiles (DESIGN §4): for a query tile at absolute rows [qs, qe) (query row r is at
``q_offset + r``) and a key tile with per-tile min/max of lo and hi, the tile is

    skipped  if max(hi) <= qs or min(lo) >= qe     (no key visible to any of its queries)
    full     if max(lo) <= qs and min(hi) >= qe    (every key visible to every query)
    partial  otherwise                             (mask_mod decides per element)

This costs O(T + nQ * nK) and never materialises the [T, T] mask that
``create_block_mask`` evaluates. Tiles cut by the end of the sequence are never full (as in
``create_block_mask``), so T need not be a multiple of B. The classification is
conservative: a partial tile may turn out empty, never the reverse.

On CUDA ``flex_attention`` is compiled (``dynamic=False``: micro-batches have a static
token budget, and a new mask_mod closure over new lo/hi tensors does not recompile). On
CPU it runs uncompiled, forward only: torch has no CPU backward for FlexAttention. The
query offset enters the mask_mod as a 0-d tensor, so a new offset alone does not recompile
(a new (Tq, T) shape does: ``dynamic=False``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from modus_mega.ops.attention import AttentionBackend, check_qkv
from modus_mega.ops.mask import check_lo_hi, check_query_rows

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's default sparse block size


def lo_hi_mask_mod(
    lo: Tensor, hi: Tensor, q_offset: Tensor | None = None
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention ``mask_mod`` of the column intervals: key kv is visible to query row
    q_idx iff lo <= q_offset + q_idx < hi (q_offset: absolute position of query row 0, a 0-d
    tensor; None, the training path, compares q_idx itself)."""
    if q_offset is None:

        def mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (lo[kv_idx] <= q_idx) & (q_idx < hi[kv_idx])

        return mask_mod

    def offset_mask_mod(batch: Tensor, head: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        position = q_idx + q_offset
        return (lo[kv_idx] <= position) & (position < hi[kv_idx])

    return offset_mask_mod


def classify_tiles(
    lo: Tensor, hi: Tensor, block_size: int, q_offset: int = 0, num_queries: int | None = None
) -> tuple[Tensor, Tensor]:
    """Classify the query x key tiles of a [Tq, T] mask from per-key-tile min/max of lo and hi.

    Query row r sits at absolute position ``q_offset + r``; ``num_queries`` defaults to
    T - q_offset (the last rows).

    Returns:
        ``partial, full``: bool [nQ, nK]; a tile in neither is skipped (module docstring).
    """
    num_tokens = check_lo_hi(lo, hi)
    num_queries = check_query_rows(num_tokens, q_offset, num_queries)
    num_blocks = -(-num_tokens // block_size)
    num_q_blocks = -(-num_queries // block_size)
    pad = num_blocks * block_size - num_tokens
    int32 = torch.iinfo(torch.int32)

    def per_tile(values: Tensor, pad_value: int) -> Tensor:  # [T] -> [nK, B]
        return torch.cat([values, values.new_full((pad,), pad_value)]).view(num_blocks, block_size)

    # Pad values are neutral for the reduction they feed; every tile holds >= 1 real key.
    lo_min = per_tile(lo, int32.max).amin(dim=1)  # [nK]
    lo_max = per_tile(lo, int32.min).amax(dim=1)
    hi_min = per_tile(hi, int32.max).amin(dim=1)
    hi_max = per_tile(hi, int32.min).amax(dim=1)

    key_tile_end = torch.arange(1, num_blocks + 1, device=lo.device) * block_size  # [nK]
    key_whole = key_tile_end <= num_tokens  # [nK]: key tile not cut by the end of the keys
    row_start = torch.arange(num_q_blocks, device=lo.device) * block_size  # [nQ], query rows
    row_end = (row_start + block_size).clamp_max(num_queries)  # [nQ]
    q_whole = row_end - row_start == block_size  # [nQ]: query tile not cut by the last row
    q_start, q_end = (q_offset + row_start)[:, None], (q_offset + row_end)[:, None]  # [nQ, 1]

    touched = (lo_min[None, :] < q_end) & (hi_max[None, :] > q_start)  # [nQ, nK]
    full = (
        (lo_max[None, :] <= q_start)
        & (hi_min[None, :] >= q_end)
        & q_whole[:, None]
        & key_whole[None, :]
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
    lo: Tensor,
    hi: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    q_offset: int = 0,
    num_queries: int | None = None,
) -> BlockMask:
    """The FlexAttention BlockMask of ``lo, hi`` (int32 [T]) for the query rows
    ``[q_offset, q_offset + Tq)`` (default: all T rows), on lo's device."""
    num_tokens = check_lo_hi(lo, hi)
    num_queries = check_query_rows(num_tokens, q_offset, num_queries)
    if num_queries == 0:
        raise ValueError("FlexAttention needs at least one query row; lo/hi or the range is empty")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    partial, full = classify_tiles(lo, hi, block_size, q_offset, num_queries)
    partial_counts, partial_indices = _ordered(partial)
    full_counts, full_indices = _ordered(full)
    offset = None if q_offset == 0 else torch.tensor(q_offset, dtype=torch.int32, device=lo.device)
    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_indices,
        full_counts,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=lo_hi_mask_mod(lo, hi, offset),
        seq_lengths=(num_queries, num_tokens),
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

    def prepare(
        self, lo: Tensor, hi: Tensor, q_offset: int = 0, num_queries: int | None = None
    ) -> BlockMask:
        """Build the BlockMask of this micro-batch on lo's device (no host sync)."""
        return block_mask_from_lo_hi(lo, hi, self.block_size, q_offset, num_queries)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prepared: BlockMask, scale: float) -> Tensor:
        """[Tq, Hq, D] masked attention in q's dtype; see ``AttentionBackend.forward``."""
        check_qkv(q, k, v, prepared.seq_lengths[1], prepared.seq_lengths[0])
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
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, Tq, D]
            k.transpose(0, 1).unsqueeze(0),  # [1, Hkv, T, D]
            v.transpose(0, 1).unsqueeze(0),
            block_mask=prepared,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # [1, Hq, Tq, D]
        return out.squeeze(0).transpose(0, 1).contiguous()
