"""Semantic mIoU against torchmetrics and by hand; instance matched IoU against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from modus_mega.eval.metrics.segmentation import instance_iou_matrix, matched_instance_iou, semantic_miou


def test_semantic_hand_computed_absent_classes_and_out_of_range_ids() -> None:
    target = np.array([[0, 1, 1, 1, 2]])
    pred = np.array([[0, 0, 1, 1, 9]])  # 9 is no class: wrong for class 2, no false positive anywhere
    m = semantic_miou(pred, target, num_classes=5)
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 2, FN 1 -> 2/3; class 2: FN 1 -> 0; classes 3, 4 absent
    assert m.iou_per_class[:3] == pytest.approx((0.5, 2 / 3, 0.0))
    assert np.isnan(m.iou_per_class[3]) and np.isnan(m.iou_per_class[4])
    assert m.miou == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_semantic_matches_torchmetrics_with_an_ignore_label() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(3, 16, 16))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 6, size=target.shape))
    pred[pred == 255] = 0
    reference = MulticlassJaccardIndex(num_classes=6, average="macro", ignore_index=255)
    expected = float(reference(torch.from_numpy(pred), torch.from_numpy(target)))
    assert semantic_miou(pred, target, num_classes=6, ignore_index=255).miou == pytest.approx(expected, rel=1e-6)


def test_semantic_perfect_and_shuffled() -> None:
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, size=(2, 16, 16))
    assert semantic_miou(target, target, num_classes=5).miou == 1.0
    shuffled = rng.permutation(target.ravel()).reshape(target.shape)
    assert semantic_miou(shuffled, target, num_classes=5).miou < 0.3
    with pytest.raises(ValueError, match="target ids"):
        semantic_miou(target, target + 5, num_classes=5)


def test_instance_hand_computed_with_unmatched_segments() -> None:
    target = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    pred = np.array([[7, 7, 7, 5, 5, 5, 5, 3]])  # 3 predicted segments for 2 targets
    # columns = predicted ids 3, 5, 7: IoU(1, 5) = 1/7, IoU(1, 7) = 3/4, IoU(2, 3) = 1/4, IoU(2, 5) = 3/5
    np.testing.assert_allclose(instance_iou_matrix(pred, target), [[0, 1 / 7, 3 / 4], [1 / 4, 3 / 5, 0]])
    # the matching takes (1, 7) and (2, 5); segment 3 stays unmatched and counts as 0
    assert matched_instance_iou(pred, target) == pytest.approx((3 / 4 + 3 / 5) / 3)


def test_instance_matches_brute_force_matching() -> None:
    rng = np.random.default_rng(2)
    for _ in range(5):
        target, pred = rng.integers(0, 4, size=(10, 10)), rng.integers(10, 15, size=(10, 10))
        iou = instance_iou_matrix(pred, target)
        rows = range(iou.shape[0])
        best = max(iou[rows, list(cols)].sum() for cols in itertools.permutations(range(iou.shape[1]), len(rows)))
        assert matched_instance_iou(pred, target) == pytest.approx(best / max(iou.shape))


def test_instance_ids_are_arbitrary_ignore_label_and_shuffled() -> None:
    rng = np.random.default_rng(3)
    target = np.repeat(np.repeat(rng.integers(0, 6, size=(4, 4)), 4, 0), 4, 1)  # [16, 16] blocky segments
    relabelled = (target * 7 + 3) % 50  # the same segments under other ids
    assert matched_instance_iou(relabelled, target) == 1.0
    shuffled = rng.permutation(target.ravel()).reshape(target.shape)
    assert matched_instance_iou(shuffled, target) < 0.4
    ignored = np.where(target == 0, 99, target)
    noisy = np.where(target == 0, rng.integers(0, 6, size=target.shape), relabelled)  # garbage where ignored
    assert matched_instance_iou(noisy, ignored, ignore_index=99) == 1.0
