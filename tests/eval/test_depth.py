"""Depth metrics: hand-computed values, the alignment against numpy's polyfit, masks, perfection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modus_mega.data import render
from modus_mega.eval.metrics.depth import align_affine, depth_metrics


def _depth(rng: np.random.Generator, shape: tuple[int, ...] = (16, 16)) -> np.ndarray:
    return rng.uniform(0.5, 20.0, size=shape)


def test_hand_computed_case() -> None:
    # pred = gt + e with e orthogonal to 1 and gt; the fit gt ~ a pred + b solves
    # 34 a + 10 b = 30, 10 a + 4 b = 10: a = 5/9, b = 10/9, aligned = [20, 15, 20, 35] / 9.
    gt = np.array([[1.0, 2.0, 3.0, 4.0]])
    pred = gt + np.array([[1.0, -1.0, -1.0, 1.0]])
    m = depth_metrics(pred, gt, space="depth")
    error = np.array([11, 3, 7, 1]) / 9  # |aligned - gt|
    assert m.abs_rel == pytest.approx(np.mean(error / gt[0]))
    assert m.rmse == pytest.approx(np.sqrt(180 / 324))
    # ratios max(p/d, d/p): 20/9, 6/5, 27/20, 36/35
    assert (m.delta1, m.delta2, m.delta3) == pytest.approx((0.5, 0.75, 0.75))
    assert m.num_images == 1


def test_alignment_matches_polyfit() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=200), rng.normal(size=200)
    slope, intercept = np.polyfit(pred, target, 1)
    np.testing.assert_allclose(align_affine(pred, target), slope * pred + intercept, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("space", ["log_depth", "depth", "inverse_depth"])
def test_ground_truth_up_to_affine_is_perfect_and_shuffled_is_not(space: str) -> None:
    rng = np.random.default_rng(1)
    gt = _depth(rng, (2, 16, 16))
    in_space = {"log_depth": np.log(gt), "depth": gt, "inverse_depth": 1 / gt}[space]
    m = depth_metrics(-3.0 * in_space + 7.0, gt, space=space)
    assert m.abs_rel == pytest.approx(0.0, abs=1e-9) and m.rmse == pytest.approx(0.0, abs=1e-8)
    assert (m.delta1, m.delta2, m.delta3) == (1.0, 1.0, 1.0)
    shuffled = rng.permutation(in_space.ravel()).reshape(in_space.shape)
    worse = depth_metrics(shuffled, gt, space=space)
    assert worse.abs_rel > 0.3 and worse.delta1 < 0.5


def test_rendered_depth_image_is_affine_in_log_depth() -> None:
    # What MODUS generates: the per-image normalised log-depth image (data/render.py). Its channel
    # mean aligns exactly in log depth, so ground truth scores perfectly; the sky (0) is ignored.
    rng = np.random.default_rng(2)
    gt = _depth(rng).astype(np.float32)
    gt[:3] = 0.0
    image = render.depth_to_image(gt).mean(0)
    m = depth_metrics(image, gt)
    assert m.abs_rel < 1e-5 and m.delta1 == 1.0


def test_invalid_pixels_and_masks_are_ignored() -> None:
    rng = np.random.default_rng(3)
    gt, pred = _depth(rng), _depth(rng)
    mask = rng.random(gt.shape) < 0.6
    reference = depth_metrics(pred[mask][None], gt[mask][None])
    gt_holes = np.where(mask, gt, 0.0)  # invalid target depth
    pred_junk = np.where(mask, pred, 1e6)  # whatever is predicted there must not matter
    assert depth_metrics(pred_junk, gt_holes) == reference
    assert depth_metrics(pred_junk, gt, valid=mask) == reference


def test_images_weigh_the_same_and_torch_inputs_work() -> None:
    rng = np.random.default_rng(4)
    gts, preds = [_depth(rng, (8, 8)), _depth(rng, (12, 6))], [_depth(rng, (8, 8)), _depth(rng, (12, 6))]
    both = depth_metrics([torch.from_numpy(p) for p in preds], gts)
    singles = [depth_metrics(p, g) for p, g in zip(preds, gts)]
    assert both.abs_rel == pytest.approx(np.mean([s.abs_rel for s in singles]))
    assert both.rmse == pytest.approx(np.mean([s.rmse for s in singles]))
    assert both.num_images == 2


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="space"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 2)), space="disparity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no image has a valid pixel"):
        depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        depth_metrics(np.ones((2, 3)), np.ones((2, 2)))
