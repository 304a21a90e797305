"""The column-interval mask (ops.mask) against the DESIGN §4 predicate, written out densely."""

from __future__ import annotations

import random

import pytest
import torch

from modus_mega.ops.mask import (
    check_lo_hi,
    dense_mask_from_layout,
    dense_mask_from_lo_hi,
    independent_blocks,
    layout_num_tokens,
    lo_hi_for_layout,
    padding_lo_hi,
    sample_random_layout,
)

NUM_RANDOM_LAYOUTS = 400


def _random_layouts(seed: int, count: int) -> list:
    rng = random.Random(seed)
    return [sample_random_layout(rng) for _ in range(count)]


def _with_padding(
    layout: list, num_padding: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lo, hi of a layout followed by padding, and the oracle mask built without lo/hi."""
    num_real = layout_num_tokens(layout)
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(num_real, num_padding)
    total = num_real + num_padding
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:num_real, :num_real] = dense_mask_from_layout(layout)
    allowed[num_real:, num_real:] = torch.eye(num_padding, dtype=torch.bool)
    return torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi]), allowed


def test_lo_hi_of_a_hand_written_layout_follow_the_design_table() -> None:
    layout = [
        [("causal", 2), ("full", 3), ("noise", 2), ("causal", 1)],  # tokens 0..7, end 8
        [("noise", 1), ("causal", 2)],  # tokens 8..10, end 11
    ]
    lo, hi = lo_hi_for_layout(layout)
    assert lo.dtype == hi.dtype == torch.int32
    assert lo.tolist() == [0, 1, 2, 2, 2, 5, 5, 7, 8, 9, 10]
    assert hi.tolist() == [8, 8, 8, 8, 8, 7, 7, 8, 9, 11, 11]


@pytest.mark.parametrize("seed", range(4))
def test_lo_hi_matches_the_dense_predicate_on_random_layouts(seed: int) -> None:
    for layout in _random_layouts(seed, NUM_RANDOM_LAYOUTS // 4):
        lo, hi = lo_hi_for_layout(layout)
        assert lo.shape == (layout_num_tokens(layout),)
        assert torch.equal(dense_mask_from_lo_hi(lo, hi), dense_mask_from_layout(layout)), layout


def test_dense_predicate_spot_checks() -> None:
    # text(2) | full split(3) | noise split(2) | text(1), then a second sample: text(2)
    layout = [[("causal", 2), ("full", 3), ("noise", 2), ("causal", 1)], [("causal", 2)]]
    allowed = dense_mask_from_layout(layout)
    assert not allowed[0, 1]  # causal: no looking ahead
    assert allowed[2, 4] and allowed[4, 2]  # inside one full split, both directions
    assert allowed[5, 4] and allowed[5, 6]  # noise tokens see earlier tokens and their split
    assert not allowed[7, 5] and not allowed[7, 6]  # later text never sees the noise split
    assert allowed[7, 4]  # but does see the full split
    assert not allowed[8, 0] and not allowed[9, 7]  # nothing crosses samples


def test_noise_splits_do_not_see_each_other() -> None:
    allowed = dense_mask_from_layout([[("noise", 2), ("noise", 3)]])
    assert not allowed[2:, :2].any() and not allowed[:2, 2:].any()
    assert allowed[:2, :2].all() and allowed[2:, 2:].all()


def test_offset_shifts_every_position_and_documents_concatenate() -> None:
    layouts = _random_layouts(seed=10, count=30)
    lo_all, hi_all = lo_hi_for_layout([sample for layout in layouts for sample in layout])
    lo_parts, hi_parts, offset = [], [], 0
    for layout in layouts:
        base_lo, base_hi = lo_hi_for_layout(layout)
        lo, hi = lo_hi_for_layout(layout, offset=offset)
        assert torch.equal(lo, base_lo + offset) and torch.equal(hi, base_hi + offset)
        lo_parts.append(lo)
        hi_parts.append(hi)
        offset += layout_num_tokens(layout)
    assert torch.equal(torch.cat(lo_parts), lo_all) and torch.equal(torch.cat(hi_parts), hi_all)


def test_padding_sees_only_itself_and_no_real_token_sees_padding() -> None:
    layout = [[("causal", 3), ("noise", 2)], [("full", 2)]]
    lo, hi, oracle = _with_padding(layout, num_padding=4)
    pad_lo, pad_hi = padding_lo_hi(7, 4)
    assert pad_lo.tolist() == [7, 8, 9, 10] and pad_hi.tolist() == [8, 9, 10, 11]
    allowed = dense_mask_from_lo_hi(lo, hi)
    assert torch.equal(allowed, oracle)
    assert not allowed[:7, 7:].any()
    assert torch.equal(allowed[7:, 7:], torch.eye(4, dtype=torch.bool))
    assert padding_lo_hi(5, 0)[0].numel() == 0


@pytest.mark.parametrize("seed", range(2))
def test_independent_blocks_are_exactly_the_valid_boundaries(seed: int) -> None:
    rng = random.Random(100 + seed)
    for layout in _random_layouts(seed + 20, 100):
        num_padding = rng.choice([0, 0, 1, 5])
        lo, hi, allowed = _with_padding(layout, num_padding)
        total = lo.shape[0]
        blocks = independent_blocks(lo, hi)

        assert blocks[0][0] == 0 and blocks[-1][1] == total
        assert all(a < b for a, b in blocks)
        assert all(blocks[i][1] == blocks[i + 1][0] for i in range(len(blocks) - 1))
        cuts = {b for _, b in blocks[:-1]}
        # Brute force, from the oracle mask: b is a boundary iff no pair crosses it.
        expected = {
            b for b in range(1, total) if not allowed[b:, :b].any() and not allowed[:b, b:].any()
        }
        assert cuts == expected, layout

        starts = [0]
        for sample in layout[:-1]:
            starts.append(starts[-1] + sum(length for _, length in sample))
        num_real = total - num_padding
        assert set(starts[1:]) | set(range(num_real, total)) <= cuts | {0}
        for a, b in blocks:  # no allowed pair between a block and the rest
            assert not allowed[a:b, :a].any() and not allowed[a:b, b:].any()


def test_independent_blocks_of_nothing() -> None:
    empty = torch.empty(0, dtype=torch.int32)
    assert independent_blocks(empty, empty) == []


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([[]], "sample 0 has no runs"),
        ([[("causal", 2)], [("image", 3)]], "unknown mode 'image'"),
        ([[("causal", 0)]], "length must be an integer >= 1"),
        ([[("full", -2)]], "length must be an integer >= 1"),
        ([[("noise", 2.5)]], "length must be an integer >= 1"),
        ([[("noise", True)]], "length must be an integer >= 1"),
        ([[("causal",)]], "expected a \\(mode, length\\) pair"),
    ],
)
def test_bad_layouts_raise(layout: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lo_hi_for_layout(layout)
    with pytest.raises(ValueError, match=message):
        dense_mask_from_layout(layout)


def test_bad_offsets_and_padding_raise() -> None:
    with pytest.raises(ValueError, match="offset must be an integer >= 0"):
        lo_hi_for_layout([[("causal", 1)]], offset=-1)
    with pytest.raises(ValueError, match="beyond int32"):
        lo_hi_for_layout([[("causal", 1)]], offset=2**31 - 1)
    with pytest.raises(ValueError, match="length must be an integer >= 0"):
        padding_lo_hi(0, -3)


def test_check_lo_hi_names_the_problem() -> None:
    lo, hi = lo_hi_for_layout([[("causal", 4)]])
    assert check_lo_hi(lo, hi) == 4
    with pytest.raises(ValueError, match="int32"):
        check_lo_hi(lo.long(), hi.long())
    with pytest.raises(ValueError, match="one length"):
        check_lo_hi(lo, hi[:3])
    with pytest.raises(ValueError, match="one length"):
        check_lo_hi(lo[None], hi[None])


def test_numpy_style_integer_lengths_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    lo, hi = lo_hi_for_layout([[("causal", np.int64(2)), ("full", np.int32(3))]])
    assert lo.tolist() == [0, 1, 2, 2, 2] and hi.tolist() == [5] * 5
