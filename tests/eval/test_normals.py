"""Normal metrics: hand-computed angles, validity, scale invariance, perfection."""

from __future__ import annotations

import numpy as np
import pytest

from modus_mega.eval.metrics.normals import angular_error_deg, normal_metrics


def _rotated_about_y(degrees: np.ndarray) -> np.ndarray:
    """Unit normals [n, 3] at ``degrees`` from +z."""
    r = np.radians(degrees)
    return np.stack([np.sin(r), np.zeros_like(r), np.cos(r)], axis=-1)


def test_hand_computed_angles() -> None:
    target = np.tile([0.0, 0.0, 1.0], (1, 4, 1))  # [1, 4, 3]
    pred = _rotated_about_y(np.array([0.0, 10.0, 20.0, 40.0]))[None] * 3.0  # length does not matter
    m = normal_metrics(pred, target)
    assert m.mean_deg == pytest.approx(17.5) and m.median_deg == pytest.approx(15.0)
    assert (m.within_11_25, m.within_22_5, m.within_30) == pytest.approx((50.0, 75.0, 75.0))
    assert m.num_pixels == 4


def test_matches_arccos_and_zero_prediction_is_ninety_degrees() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(100, 3)), rng.normal(size=(100, 3))
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    unit = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
    reference = np.degrees(np.arccos(np.clip((unit * target).sum(-1), -1, 1)))
    np.testing.assert_allclose(angular_error_deg(pred, target), reference, atol=1e-6)
    assert angular_error_deg(np.zeros((1, 3)), target[:1])[0] == 90.0


def test_ground_truth_is_perfect_shuffled_is_not_and_invalid_pixels_are_ignored() -> None:
    rng = np.random.default_rng(1)
    target = rng.normal(size=(2, 8, 8, 3))
    target /= np.linalg.norm(target, axis=-1, keepdims=True)
    target[:, :2] = 0.0  # sky: no normal
    pred = np.where(target.any(-1, keepdims=True), target, rng.normal(size=target.shape))
    m = normal_metrics(pred, target)
    assert m.mean_deg == pytest.approx(0.0, abs=1e-6) and m.within_11_25 == 100.0
    assert m.num_pixels == 2 * 6 * 8
    shuffled = rng.permutation(target.reshape(-1, 3)).reshape(target.shape)
    assert normal_metrics(shuffled, target).mean_deg > 45.0
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[:, 4:] = True
    assert normal_metrics(shuffled, target, valid=mask).num_pixels == 2 * 4 * 8


def test_no_valid_pixel_is_an_error() -> None:
    with pytest.raises(ValueError, match="no valid pixel"):
        normal_metrics(np.ones((2, 2, 3)), np.zeros((2, 2, 3)))
