"""Block metadata of the CUDA attention kernels, in plain PyTorch: the specification.

Legend: T = tokens (keys) of the packed micro-batch; Tq = query rows (T, unless the queries
are rows of a cache: query row r at absolute position ``q_offset + r``); Bq / Bk = query
rows / keys per tile; nQ = ceil(Tq / Bq), nK = ceil(T / Bk).

The kernels never read a dense mask. Per micro-batch they get, once, for every key block of
Bk keys the bounds of its column intervals (DESIGN §4: key k sees query rows
``[lo[k], hi[k])``), and from those a list of the tiles worth computing:

    bounds[j] = (lo_min, lo_max, hi_min, hi_max) over the keys of block j, after clamping
                lo and hi into [0, T] and replacing an empty interval (lo >= hi) by (T, 0)

    tile (query block i, key block j) covers the absolute rows [r0, r1) with
    r0 = q_offset + i Bq, r1 = q_offset + min((i + 1) Bq, Tq), and is
        skipped  iff lo_min >= r1 or hi_max <= r0      no key of j sees any row
        full     iff lo_max <= r0 and hi_min >= r1     every key of j sees every row
        partial  otherwise                             masked elementwise from lo/hi

"full" is exact. "skipped" is exact whenever every key sees itself (lo[k] <= k < hi[k]; the
packer guarantees it, padding included, see ``ops.mask``): a key block then lies entirely
before, after or across a query block, and in each case one of the two bounds decides.
Otherwise it is conservative: a partial tile may turn out empty, never the reverse.

Lists: row ``o`` of ``blocks`` names the non-skipped inner blocks of outer block ``o`` in
ascending order, each as ``(inner << 1) | partial``, then -1 up to the row length;
``counts[o]`` is their number and ``order`` the outer blocks by decreasing count (the
kernels' launch order, so the longest blocks do not form the tail). Two tilings are built:

    fwd  outer = query blocks of 128 rows, inner = key blocks of 64 (forward and the
         deterministic dQ kernel)
    bwd  outer = key blocks of 128, inner = query blocks of 64 (the dK/dV kernel)

Size: the two lists hold 2 x ceil(T/128) x ceil(T/64) int32, T^2 / 1024 bytes (over a
cache: ceil(Tq/128) x ceil(T/64) + ceil(T/128) x ceil(Tq/64)). We cap
them at ``MAX_METADATA_BYTES`` = 64 MiB, which is T = ``MAX_METADATA_TOKENS`` = 262144
(256k, 8x the 7B run's 32k token budget; 1 MiB there); beyond it ``check_metadata_size``
refuses with the fix instead of allocating gigabytes (1M tokens would need 1 GiB).

``csrc/modus_attn/block_metadata_kernel.h`` builds the same tensors on the GPU (no host
sync); this module is what CPU tests check against the dense rule, and what the GPU tests
compare the kernels with, tensor for tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modus_mega.ops.mask import check_lo_hi, check_query_rows

# Tile shapes; csrc/modus_attn/modus_attn.h holds the same constants.
FWD_BLOCK_Q = 128  # query rows per forward / dQ tile
FWD_BLOCK_K = 64  # keys per forward / dQ tile
BWD_BLOCK_Q = 64  # query rows per dK/dV step
BWD_BLOCK_K = 128  # keys per dK/dV thread block

MAX_METADATA_TOKENS = 262144  # largest T whose tile lists fit MAX_METADATA_BYTES
# 64 MiB: the two lists at T = MAX_METADATA_TOKENS, 2 x 2048 x 4096 int32.
MAX_METADATA_BYTES = 8 * (MAX_METADATA_TOKENS // BWD_BLOCK_K) * (MAX_METADATA_TOKENS // FWD_BLOCK_K)

TILE_SKIPPED = 0
TILE_FULL = 1
TILE_PARTIAL = 2


@dataclass(frozen=True)
class BlockMetadata:
    """Everything the CUDA kernels need about one micro-batch's mask; built once, reused by
    every layer. All tensors are int32 on lo's device."""

    lo: Tensor  # [T]
    hi: Tensor  # [T]
    q_offset: int  # absolute position of query row 0 (0 unless over a cache)
    num_queries: int  # Tq, the query rows
    fwd_bounds: Tensor  # [ceil(T / 64), 4]
    fwd_blocks: Tensor  # [ceil(Tq / 128), ceil(T / 64)]
    fwd_counts: Tensor  # [ceil(Tq / 128)]
    fwd_order: Tensor  # [ceil(Tq / 128)]
    bwd_bounds: Tensor  # [ceil(T / 128), 4]
    bwd_blocks: Tensor  # [ceil(T / 128), ceil(Tq / 64)]
    bwd_counts: Tensor  # [ceil(T / 128)]
    bwd_order: Tensor  # [ceil(T / 128)]

    @property
    def num_tokens(self) -> int:
        """T, the keys this metadata describes."""
        return self.lo.shape[0]

    @property
    def over_cache(self) -> bool:
        """Whether the queries are not all the keys' rows (the kernels' backward refuses)."""
        return self.q_offset != 0 or self.num_queries != self.num_tokens


def _num_blocks(num_tokens: int, block: int) -> int:
    return -(-num_tokens // block)


def metadata_bytes(num_tokens: int, num_queries: int | None = None) -> int:
    """Bytes of the two tile lists of ``num_tokens`` keys and ``num_queries`` (default: as
    many) query rows."""
    num_queries = num_tokens if num_queries is None else num_queries
    return 4 * (
        _num_blocks(num_queries, FWD_BLOCK_Q) * _num_blocks(num_tokens, FWD_BLOCK_K)
        + _num_blocks(num_tokens, BWD_BLOCK_K) * _num_blocks(num_queries, BWD_BLOCK_Q)
    )


def check_metadata_size(num_tokens: int, num_queries: int | None = None) -> None:
    """Refuse a micro-batch whose tile lists would exceed ``MAX_METADATA_BYTES``.

    Raises:
        ValueError: naming T, the limit and the fix.
    """
    size = metadata_bytes(num_tokens, num_queries)
    if size > MAX_METADATA_BYTES:
        queries = "" if num_queries in (None, num_tokens) else f" and {num_queries} query rows"
        raise ValueError(
            f"the CUDA attention block metadata of T = {num_tokens} tokens{queries} needs "
            f"{size / 2**20:.0f} MiB (it grows as T^2); the limit is T = {MAX_METADATA_TOKENS} "
            f"({MAX_METADATA_BYTES // 2**20} MiB). Set data.token_budget <= {MAX_METADATA_TOKENS} "
            f"or use attention backend 'flex'"
        )


def key_block_bounds(lo: Tensor, hi: Tensor, block_k: int) -> Tensor:
    """Per key block of ``block_k`` keys: (lo_min, lo_max, hi_min, hi_max), int32 [nK, 4].

    lo and hi are clamped into [0, T] and an empty interval becomes (T, 0), which can never
    make a tile non-empty and always makes it non-full (module docstring).
    """
    num_tokens = check_lo_hi(lo, hi)
    if block_k < 1:
        raise ValueError(f"block_k must be >= 1, got {block_k}")
    num_blocks = _num_blocks(num_tokens, block_k)
    lo_c = lo.clamp(0, num_tokens)
    hi_c = hi.clamp(0, num_tokens)
    empty = lo_c >= hi_c
    lo_c = torch.where(empty, num_tokens, lo_c)
    hi_c = torch.where(empty, 0, hi_c)
    pad = num_blocks * block_k - num_tokens

    def per_block(values: Tensor, neutral: int) -> Tensor:  # [T] -> [nK, Bk]
        return torch.cat([values, values.new_full((pad,), neutral)]).view(num_blocks, block_k)

    # Clamped values lie in [0, T], so T and 0 are neutral for min and max.
    bounds = torch.stack(
        [
            per_block(lo_c, num_tokens).amin(dim=1),
            per_block(lo_c, 0).amax(dim=1),
            per_block(hi_c, num_tokens).amin(dim=1),
            per_block(hi_c, 0).amax(dim=1),
        ],
        dim=1,
    )  # [nK, 4]
    return bounds.to(torch.int32)


def classify_tiles(
    bounds: Tensor,
    num_tokens: int,
    block_q: int,
    q_offset: int = 0,
    num_queries: int | None = None,
) -> Tensor:
    """Class of every (query block of ``block_q`` rows, key block) tile, int32 [nQ, nK]:
    ``TILE_SKIPPED``, ``TILE_FULL`` or ``TILE_PARTIAL`` (module docstring). The query rows
    are ``q_offset .. q_offset + num_queries - 1`` (default: the last rows of the
    ``num_tokens`` keys)."""
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    num_queries = check_query_rows(num_tokens, q_offset, num_queries)
    num_q_blocks = _num_blocks(num_queries, block_q)
    row_start = torch.arange(num_q_blocks, device=bounds.device, dtype=torch.int64) * block_q
    row_end = (row_start + block_q).clamp_max(num_queries)
    r0, r1 = (q_offset + row_start)[:, None], (q_offset + row_end)[:, None]  # [nQ, 1], absolute
    lo_min, lo_max, hi_min, hi_max = (bounds[:, i][None, :] for i in range(4))  # [1, nK] each
    skipped = (lo_min >= r1) | (hi_max <= r0)
    full = (lo_max <= r0) & (hi_min >= r1)
    partial = torch.full_like(skipped, TILE_PARTIAL, dtype=torch.int32)
    return torch.where(skipped, TILE_SKIPPED, torch.where(full, TILE_FULL, partial))


def tile_lists(classes: Tensor, by_key: bool) -> tuple[Tensor, Tensor]:
    """Compact tile lists from ``classes`` [nQ, nK].

    Args:
        classes: output of ``classify_tiles``.
        by_key: False gives one row per query block listing key blocks; True one row per
            key block listing query blocks.

    Returns:
        ``blocks`` int32 [n_outer, n_inner] (entries ``(inner << 1) | partial`` in ascending
        order, then -1) and ``counts`` int32 [n_outer].
    """
    per_outer = classes.t() if by_key else classes  # [n_outer, n_inner]
    num_inner = per_outer.shape[1]
    listed = per_outer != TILE_SKIPPED
    inner = torch.arange(num_inner, device=classes.device, dtype=torch.int64)
    # Listed blocks sort first, each group in ascending order.
    order_key = (
        torch.where(listed, inner, inner + num_inner).sort(dim=1).values
    )  # [n_outer, n_inner]
    is_entry = order_key < num_inner
    inner_sorted = torch.where(is_entry, order_key, order_key - num_inner)
    partial = per_outer.gather(1, inner_sorted) == TILE_PARTIAL
    entries = torch.where(is_entry, inner_sorted * 2 + partial.to(torch.int64), -1)
    return entries.to(torch.int32), listed.sum(dim=1, dtype=torch.int32)


def launch_order(counts: Tensor) -> Tensor:
    """Outer blocks by decreasing tile count (stable), int32 [n_outer]."""
    return torch.argsort(counts, dim=0, descending=True, stable=True).to(torch.int32)


def build_block_metadata_reference(
    lo: Tensor, hi: Tensor, q_offset: int = 0, num_queries: int | None = None
) -> BlockMetadata:
    """The ``BlockMetadata`` of ``lo, hi`` (int32 [T]) and the query rows
    ``[q_offset, q_offset + Tq)`` (default: all T rows), in PyTorch ops, on lo's device.

    Identical, tensor for tensor, to what the extension's ``build_block_metadata`` returns.
    """
    num_tokens = check_lo_hi(lo, hi)
    num_queries = check_query_rows(num_tokens, q_offset, num_queries)
    check_metadata_size(num_tokens, num_queries)
    lo, hi = lo.contiguous(), hi.contiguous()
    fwd_bounds = key_block_bounds(lo, hi, FWD_BLOCK_K)
    fwd_blocks, fwd_counts = tile_lists(
        classify_tiles(fwd_bounds, num_tokens, FWD_BLOCK_Q, q_offset, num_queries), by_key=False
    )
    bwd_bounds = key_block_bounds(lo, hi, BWD_BLOCK_K)
    bwd_blocks, bwd_counts = tile_lists(
        classify_tiles(bwd_bounds, num_tokens, BWD_BLOCK_Q, q_offset, num_queries), by_key=True
    )
    return BlockMetadata(
        lo=lo,
        hi=hi,
        q_offset=q_offset,
        num_queries=num_queries,
        fwd_bounds=fwd_bounds,
        fwd_blocks=fwd_blocks,
        fwd_counts=fwd_counts,
        fwd_order=launch_order(fwd_counts),
        bwd_bounds=bwd_bounds,
        bwd_blocks=bwd_blocks,
        bwd_counts=bwd_counts,
        bwd_order=launch_order(bwd_counts),
    )
