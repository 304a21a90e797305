"""Edge precision / recall / F1: hand-computed tolerance cases, brute force, BSDS bound, perfection."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from modus_mega.eval.metrics.edges import edge_metrics


def _vertical_line(column: int, rows: slice = slice(0, 10), shape: tuple[int, int] = (12, 24)) -> np.ndarray:
    edges = np.zeros(shape, dtype=bool)
    edges[rows, column] = True
    return edges


def _pairs_within(pred: np.ndarray, target: np.ndarray, tolerance: float) -> np.ndarray:
    """bool [#pred pixels, #target pixels]: pairs within the tolerance (brute force)."""
    p, t = np.argwhere(pred), np.argwhere(target)
    return np.linalg.norm(p[:, None, :] - t[None, :, :], axis=-1) <= tolerance


def test_hand_computed_tolerance_cases() -> None:
    target = _vertical_line(5)
    assert edge_metrics(target, target) == edge_metrics(target[None], target[None])
    assert edge_metrics(target, target).f1 == 1.0
    shifted = _vertical_line(6)
    assert edge_metrics(shifted, target, tolerance_px=1.5).f1 == 1.0
    assert edge_metrics(shifted, target, tolerance_px=0.5).f1 == 0.0
    assert edge_metrics(_vertical_line(7), target, tolerance_px=1.5).f1 == 0.0
    # half the line found plus 5 far pixels: precision 5/10; recall: rows 0-4 and row 5 (1 px away)
    pred = _vertical_line(5, slice(0, 5)) | _vertical_line(15, slice(0, 5))
    m = edge_metrics(pred, target, tolerance_px=1.5)
    assert (m.precision, m.recall) == pytest.approx((0.5, 0.6))
    assert m.f1 == pytest.approx(2 * 0.5 * 0.6 / 1.1)


def test_matches_brute_force_and_bounds_one_to_one_matching() -> None:
    rng = np.random.default_rng(0)
    for tolerance in (1.0, 1.5, 2.0):
        pred, target = rng.random((20, 20)) < 0.08, rng.random((20, 20)) < 0.08
        pairs = _pairs_within(pred, target, tolerance)
        m = edge_metrics(pred, target, tolerance_px=tolerance)
        assert m.precision == pytest.approx(pairs.any(1).mean())
        assert m.recall == pytest.approx(pairs.any(0).mean())
        # BSDS credits each pixel at most once: its counts cannot exceed ours
        one_to_one = int((maximum_bipartite_matching(csr_matrix(pairs), perm_type="column") >= 0).sum())
        assert one_to_one <= m.precision * pred.sum() + 1e-9 and one_to_one <= m.recall * target.sum() + 1e-9


def test_empty_maps_and_shuffled_prediction() -> None:
    empty = np.zeros((8, 8), dtype=bool)
    assert edge_metrics(empty, empty) == edge_metrics(_vertical_line(2), _vertical_line(2))
    nothing = edge_metrics(empty, _vertical_line(2, shape=(8, 8)))
    assert (nothing.precision, nothing.recall, nothing.f1) == (0.0, 0.0, 0.0)
    rng = np.random.default_rng(1)
    target = np.zeros((32, 32), dtype=bool)
    target[8, :] = target[:, 20] = True
    shuffled = rng.permutation(target.ravel()).reshape(target.shape)
    assert edge_metrics(shuffled, target).f1 < 0.5
