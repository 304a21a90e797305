"""Edge-map precision, recall and F1 with a pixel tolerance (canny, sam_edge).

Protocol: a predicted edge pixel is correct when a target edge pixel lies within
``tolerance_px`` (Euclidean, from ``scipy.ndimage.distance_transform_edt``), and a target edge
pixel is found when a predicted edge pixel lies within the tolerance. Counts are pooled over
every image; precision = correct / predicted, recall = found / target, F1 their harmonic mean.
With nothing predicted precision is 0 (1 when the target is empty too); with an empty target
recall is 1.

BSDS (Martin et al.; the ODS / OIS numbers) matches edge pixels one to one by a bipartite
assignment, with a tolerance of 0.0075 of the image diagonal, so a pixel is credited at most
once. Here a predicted pixel may cover several target pixels and the other way round, so
precision and recall are upper bounds of the one-to-one values; they coincide when every edge
is matched by an edge of the same thickness (a shift of up to the tolerance, say), and differ
for thick or doubled predictions, which one-to-one matching penalises in precision only.
Predictions are binary maps (generated edges are snapped to {0, 1}), so there is no threshold
sweep (ODS = OIS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from modus_mega.eval.metrics.arrays import ArrayLike, as_items, check_same_shapes

DEFAULT_TOLERANCE_PX = 1.5  # the 8-neighbourhood (diagonal 1.41) but not two pixels away


@dataclass(frozen=True)
class EdgeMetrics:
    """Pooled edge precision / recall / F1."""

    precision: float
    recall: float
    f1: float


def _within(edges: np.ndarray, other: np.ndarray, tolerance_px: float) -> np.ndarray:
    """bool [H, W]: pixels of ``edges`` with a pixel of ``other`` within the tolerance."""
    if not other.any():
        return np.zeros_like(edges)
    distance = distance_transform_edt(~other)  # [H, W] distance to the nearest ``other`` pixel
    return edges & (distance <= tolerance_px)


def edge_metrics(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    tolerance_px: float = DEFAULT_TOLERANCE_PX,
) -> EdgeMetrics:
    """Precision / recall / F1 of bool edge maps ([H, W], [N, H, W] or a list); module protocol."""
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    preds, targets = as_items(pred, 2), as_items(target, 2)
    check_same_shapes("edge_metrics", preds, targets)
    num_pred = num_target = correct = found = 0
    for p, t in zip(preds, targets):
        p, t = p.astype(bool), t.astype(bool)
        num_pred += int(p.sum())
        num_target += int(t.sum())
        correct += int(_within(p, t, tolerance_px).sum())
        found += int(_within(t, p, tolerance_px).sum())
    precision = correct / num_pred if num_pred else float(num_target == 0)
    recall = found / num_target if num_target else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return EdgeMetrics(precision=float(precision), recall=float(recall), f1=float(f1))
