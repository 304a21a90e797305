"""Segmentation metrics: semantic mIoU (seg) and matched mean IoU of instance segments (sam_seg).

Semantic protocol: one confusion matrix over every pixel of every image (the Cityscapes / ADE20K
convention), target pixels equal to ``ignore_index`` left out; IoU_c = TP / (TP + FP + FN);
the mean is over the classes that occur in the target or the prediction (a class absent from
both has no IoU and is not averaged as 0 or 1). Predicted ids outside [0, num_classes) count as
wrong for the target class and belong to no class.

Instance protocol (ids are arbitrary labels, so predictions and targets are matched first): per
image, the IoU of every (target segment, predicted segment) pair; a Hungarian matching
(``scipy.optimize.linear_sum_assignment``) maximises the summed IoU; every segment left
unmatched on either side counts as IoU 0, so the image's score is the matched IoU sum over
max(#target, #predicted) segments: missing and spurious segments both cost. Scores are averaged
over images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from modus_mega.eval.metrics.arrays import ArrayLike, as_items, check_same_shapes


@dataclass(frozen=True)
class SemanticMetrics:
    """mIoU and the per-class IoUs behind it."""

    miou: float
    iou_per_class: tuple[float, ...]  # [num_classes]; nan for classes absent from both sides


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes, num_classes + 1]: row = target class, column = predicted class.

    The last column collects predicted ids outside [0, num_classes). Targets must lie in range.
    """
    pred_index = np.where((pred >= 0) & (pred < num_classes), pred, num_classes).astype(np.int64)
    flat = target.astype(np.int64) * (num_classes + 1) + pred_index
    return np.bincount(flat, minlength=num_classes * (num_classes + 1)).reshape(num_classes, num_classes + 1)


def semantic_miou(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    num_classes: int,
    ignore_index: int | None = None,
) -> SemanticMetrics:
    """mIoU of integer label maps ([H, W], [N, H, W] or a list of [H, W]); module protocol."""
    preds, targets = as_items(pred, 2), as_items(target, 2)
    check_same_shapes("semantic_miou", preds, targets)
    confusion = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for p, t in zip(preds, targets):
        keep = t != ignore_index if ignore_index is not None else np.ones(t.shape, dtype=bool)
        t_kept = t[keep]
        if t_kept.size and (t_kept.min() < 0 or t_kept.max() >= num_classes):
            raise ValueError(
                f"semantic_miou: target ids must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, "
                f"got [{t_kept.min()}, {t_kept.max()}]"
            )
        confusion += confusion_matrix(p[keep], t_kept, num_classes)
    tp = np.diag(confusion[:, :num_classes]).astype(np.float64)
    union = confusion.sum(1) + confusion[:, :num_classes].sum(0) - tp  # FN + FP + TP
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    if np.isnan(iou).all():
        raise ValueError("semantic_miou: no class occurs in the targets or predictions (all pixels ignored?)")
    return SemanticMetrics(miou=float(np.nanmean(iou)), iou_per_class=tuple(float(v) for v in iou))


def instance_iou_matrix(pred: np.ndarray, target: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """float64 [#target segments, #predicted segments] IoUs of two id maps of one image.

    Pixels whose target is ``ignore_index`` are left out on both sides (and that id is no
    target segment).
    """
    keep = target != ignore_index if ignore_index is not None else np.ones(target.shape, dtype=bool)
    target_ids, t_index = np.unique(target[keep], return_inverse=True)
    pred_ids, p_index = np.unique(pred[keep], return_inverse=True)
    joint = np.bincount(t_index * len(pred_ids) + p_index, minlength=len(target_ids) * len(pred_ids))
    intersection = joint.reshape(len(target_ids), len(pred_ids)).astype(np.float64)
    union = intersection.sum(1, keepdims=True) + intersection.sum(0, keepdims=True) - intersection
    return intersection / np.maximum(union, 1.0)


def matched_instance_iou(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    ignore_index: int | None = None,
) -> float:
    """Mean over images of the Hungarian-matched IoU of instance id maps (module protocol)."""
    preds, targets = as_items(pred, 2), as_items(target, 2)
    check_same_shapes("matched_instance_iou", preds, targets)
    scores = []
    for p, t in zip(preds, targets):
        iou = instance_iou_matrix(p, t, ignore_index)  # [#target, #pred]
        if iou.size == 0:
            scores.append(1.0 if iou.shape == (0, 0) else 0.0)
            continue
        rows, cols = linear_sum_assignment(iou, maximize=True)
        scores.append(float(iou[rows, cols].sum() / max(iou.shape)))
    if not scores:
        raise ValueError("matched_instance_iou: no images")
    return float(np.mean(scores))
