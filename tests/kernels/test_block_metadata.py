"""The block metadata of the CUDA attention kernels against the dense mask (CPU).

The oracle classifies each tile from the dense [T, T] mask: skipped iff the tile is all
False, full iff all True, partial otherwise. The dense mask comes from the DESIGN §4
predicate (``mask.dense_mask_from_layout``), never from lo/hi, or, for arbitrary intervals,
from ``lo[k] <= q < hi[k]`` spelled out with loops over tiles.
"""

from __future__ import annotations

import random

import pytest
import torch

from modus_mega.ops.block_metadata import (
    BWD_BLOCK_K,
    BWD_BLOCK_Q,
    FWD_BLOCK_K,
    FWD_BLOCK_Q,
    TILE_FULL,
    TILE_PARTIAL,
    TILE_SKIPPED,
    build_block_metadata_reference,
    classify_tiles,
    key_block_bounds,
    launch_order,
    tile_lists,
)
from modus_mega.ops.mask import (
    dense_mask_from_layout,
    layout_num_tokens,
    lo_hi_for_layout,
    padding_lo_hi,
    sample_random_layout,
)

BLOCK_SHAPES = [(1, 1), (3, 5), (8, 8), (16, 4), (7, 32), (64, 128), (128, 64)]


def _dense_tile_classes(allowed: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Tile classes from a dense bool [Tq, T] mask (allowed[q, k]), int32 [nQ, nK]."""
    num_rows, num_tokens = allowed.shape
    num_q, num_k = -(-num_rows // block_q), -(-num_tokens // block_k)
    classes = torch.empty(num_q, num_k, dtype=torch.int32)
    for i in range(num_q):
        for j in range(num_k):
            tile = allowed[i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            classes[i, j] = (
                TILE_FULL
                if bool(tile.all())
                else TILE_PARTIAL
                if bool(tile.any())
                else TILE_SKIPPED
            )
    return classes


def _layout_with_padding(rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lo, hi of a random packed micro-batch (with padding) and its oracle mask."""
    layout = sample_random_layout(
        rng, max_samples=5, max_runs=6, max_run_length=rng.choice([3, 12, 40])
    )
    num_real = layout_num_tokens(layout)
    num_padding = rng.choice([0, 1, 5, 17])
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(num_real, num_padding)
    total = num_real + num_padding
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:num_real, :num_real] = dense_mask_from_layout(layout)
    allowed[num_real:, num_real:] = torch.eye(num_padding, dtype=torch.bool)
    return torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi]), allowed


def _classes(lo: torch.Tensor, hi: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    return classify_tiles(key_block_bounds(lo, hi, block_k), lo.shape[0], block_q)


@pytest.mark.parametrize("seed", range(6))
def test_classification_is_exact_on_packed_layouts(seed: int) -> None:
    """Keys see themselves in every packed layout, so all three classes are exact."""
    rng = random.Random(seed)
    for _ in range(4):
        lo, hi, allowed = _layout_with_padding(rng)
        for block_q, block_k in BLOCK_SHAPES:
            expected = _dense_tile_classes(allowed, block_q, block_k)
            assert torch.equal(_classes(lo, hi, block_q, block_k), expected), (block_q, block_k)


@pytest.mark.parametrize("seed", range(4))
def test_classification_of_arbitrary_intervals_is_sound(seed: int) -> None:
    """Arbitrary intervals (empty ones, out of range, keys that do not see themselves):
    "full" stays exact and "skipped" is never claimed for a tile with a visible pair."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 90, (1,), generator=gen))
    lo = torch.randint(-3, num_tokens + 3, (num_tokens,), generator=gen, dtype=torch.int32)
    hi = lo + torch.randint(
        -4, num_tokens // 2 + 2, (num_tokens,), generator=gen, dtype=torch.int32
    )
    rows = torch.arange(num_tokens)[:, None]
    allowed = (lo[None, :] <= rows) & (rows < hi[None, :])
    for block_q, block_k in BLOCK_SHAPES:
        got = _classes(lo, hi, block_q, block_k)
        expected = _dense_tile_classes(allowed, block_q, block_k)
        assert torch.equal(got == TILE_FULL, expected == TILE_FULL)
        assert not bool(((got == TILE_SKIPPED) & (expected != TILE_SKIPPED)).any())


def test_classification_is_exact_when_every_key_sees_itself() -> None:
    """The exactness condition alone (random intervals around each key), not the packer."""
    gen = torch.Generator().manual_seed(11)
    num_tokens = 150
    keys = torch.arange(num_tokens, dtype=torch.int32)
    lo = (keys - torch.randint(0, 40, (num_tokens,), generator=gen)).clamp_min(0).to(torch.int32)
    hi = (keys + 1 + torch.randint(0, 40, (num_tokens,), generator=gen)).to(torch.int32)
    rows = torch.arange(num_tokens)[:, None]
    allowed = (lo[None, :] <= rows) & (rows < hi[None, :])
    for block_q, block_k in BLOCK_SHAPES:
        assert torch.equal(
            _classes(lo, hi, block_q, block_k), _dense_tile_classes(allowed, block_q, block_k)
        )


@pytest.mark.parametrize("seed", range(3))
def test_classification_over_a_cache_is_exact_on_packed_layouts(seed: int) -> None:
    """Query rows [q_offset, q_offset + Tq) of the keys: the tiles of those rows of the
    oracle mask, for any offset (at a tile edge or not) and Tq (the last rows or fewer)."""
    rng = random.Random(200 + seed)
    for _ in range(4):
        lo, hi, allowed = _layout_with_padding(rng)
        num_tokens = lo.shape[0]
        q_offset = rng.randrange(num_tokens)
        last = num_tokens - q_offset
        num_queries = last if rng.random() < 0.5 else rng.randint(1, last)
        rows = allowed[q_offset : q_offset + num_queries]
        for block_q, block_k in BLOCK_SHAPES:
            got = classify_tiles(
                key_block_bounds(lo, hi, block_k), num_tokens, block_q, q_offset, num_queries
            )
            assert torch.equal(got, _dense_tile_classes(rows, block_q, block_k)), (
                block_q,
                block_k,
                q_offset,
                num_queries,
            )
        meta = build_block_metadata_reference(lo, hi, q_offset, num_queries)
        assert (meta.q_offset, meta.num_queries, meta.over_cache) == (
            q_offset,
            num_queries,
            q_offset > 0 or num_queries < num_tokens,
        )
        q_blocks = (-(-num_queries // FWD_BLOCK_Q), -(-num_queries // BWD_BLOCK_Q))
        k_blocks = (-(-num_tokens // FWD_BLOCK_K), -(-num_tokens // BWD_BLOCK_K))
        assert meta.fwd_blocks.shape == (q_blocks[0], k_blocks[0])
        assert meta.bwd_blocks.shape == (k_blocks[1], q_blocks[1])


def test_metadata_of_a_decode_step() -> None:
    """One query row at the end of a 300-token causal document sees every key in full
    (the kernel masks the keys past T of the last block itself)."""
    lo, hi = lo_hi_for_layout([[("causal", 300)]])
    meta = build_block_metadata_reference(lo, hi, q_offset=299)
    assert meta.fwd_counts.tolist() == [5]
    assert meta.fwd_blocks.tolist() == [[0, 2, 4, 6, 8]]
    assert meta.bwd_counts.tolist() == [1, 1, 1]


def test_key_block_bounds_clamp_and_empty_intervals() -> None:
    lo = torch.tensor([-5, 2, 7, 3], dtype=torch.int32)
    hi = torch.tensor([2, 9, 7, 1], dtype=torch.int32)  # keys 2 and 3 see nothing
    bounds = key_block_bounds(lo, hi, block_k=2)
    # block 0: intervals [0, 2) and [2, 4) (hi clamped to T = 4); block 1: both empty -> (4, 0).
    assert bounds.tolist() == [[0, 2, 2, 4], [4, 4, 0, 0]]
    assert bounds.dtype == torch.int32


def test_tile_lists_layout() -> None:
    classes = torch.tensor(
        [[TILE_FULL, TILE_SKIPPED, TILE_PARTIAL], [TILE_SKIPPED, TILE_SKIPPED, TILE_SKIPPED]],
        dtype=torch.int32,
    )
    blocks, counts = tile_lists(classes, by_key=False)
    assert blocks.tolist() == [[0, 2 * 2 + 1, -1], [-1, -1, -1]]
    assert counts.tolist() == [2, 0]
    blocks, counts = tile_lists(classes, by_key=True)
    assert blocks.tolist() == [[0, -1], [-1, -1], [1, -1]]
    assert counts.tolist() == [1, 0, 1]


def test_launch_order_is_stable_and_descending() -> None:
    counts = torch.tensor([2, 5, 2, 0, 5], dtype=torch.int32)
    assert launch_order(counts).tolist() == [1, 4, 0, 2, 3]


@pytest.mark.parametrize("seed", range(3))
def test_reference_metadata_lists_every_visible_tile(seed: int) -> None:
    """Both tilings of ``build_block_metadata_reference`` list exactly the tiles with a
    visible pair, in ascending order, with the partial bit of the dense oracle."""
    lo, hi, allowed = _layout_with_padding(random.Random(100 + seed))
    meta = build_block_metadata_reference(lo, hi)
    num_tokens = lo.shape[0]
    for blocks, counts, order, block_q, block_k, by_key in (
        (meta.fwd_blocks, meta.fwd_counts, meta.fwd_order, FWD_BLOCK_Q, FWD_BLOCK_K, False),
        (meta.bwd_blocks, meta.bwd_counts, meta.bwd_order, BWD_BLOCK_Q, BWD_BLOCK_K, True),
    ):
        oracle = _dense_tile_classes(allowed, block_q, block_k)
        per_outer = oracle.t() if by_key else oracle
        assert blocks.shape == per_outer.shape and blocks.dtype == torch.int32
        for outer in range(per_outer.shape[0]):
            visible = (per_outer[outer] != TILE_SKIPPED).nonzero().flatten().tolist()
            expected = [2 * j + int(per_outer[outer, j] == TILE_PARTIAL) for j in visible]
            assert counts[outer] == len(expected)
            assert blocks[outer].tolist() == expected + [-1] * (per_outer.shape[1] - len(expected))
        assert sorted(order.tolist()) == list(range(per_outer.shape[0]))
        assert counts[order.long()].tolist() == sorted(counts.tolist(), reverse=True)
    assert meta.num_tokens == num_tokens
    assert meta.fwd_bounds.shape == (-(-num_tokens // FWD_BLOCK_K), 4)
    assert meta.bwd_bounds.shape == (-(-num_tokens // BWD_BLOCK_K), 4)


def test_boundary_tiles_of_a_long_document() -> None:
    """T not a multiple of any tile: the last tiles are cut, not padded with phantom keys."""
    lo, hi = lo_hi_for_layout([[("causal", 200)]])
    meta = build_block_metadata_reference(lo, hi)
    # Query block 0 (rows 0..127): key blocks 0 and 1 partial (diagonal), 2 and 3 skipped.
    # Query block 1 (rows 128..199): key blocks 0 and 1 full, 2 and 3 partial (diagonal).
    assert meta.fwd_counts.tolist() == [2, 4]
    assert meta.fwd_blocks[0].tolist() == [1, 3, -1, -1]
    assert meta.fwd_blocks[1].tolist() == [0, 2, 5, 7]
    assert meta.fwd_order.tolist() == [1, 0]


def test_empty_micro_batch() -> None:
    empty = torch.zeros(0, dtype=torch.int32)
    meta = build_block_metadata_reference(empty, empty)
    assert meta.num_tokens == 0
    assert meta.fwd_blocks.shape == (0, 0) and meta.bwd_bounds.shape == (0, 4)


def test_rejects_bad_lo_hi() -> None:
    with pytest.raises(ValueError, match="int32"):
        build_block_metadata_reference(
            torch.zeros(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="block_k"):
        key_block_bounds(torch.zeros(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32), 0)
