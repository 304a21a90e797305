"""Surface-normal metrics: angular error in degrees over the valid pixels.

Protocol: the prediction is normalised to unit length per pixel (a zero vector counts as 90
degrees from any target); the angle to the target normal is ``atan2(|p x n|, p . n)`` (exact
near 0, unlike ``arccos``). Valid pixels are those whose target normal is non-zero (the sky and
unknown pixels are 0 in MODUS's normal modality) and, when given, inside the mask. Statistics
pool every valid pixel of every image (the convention of Bae et al. and Omnidata evaluations):
mean and median angle, and the share of pixels within 11.25, 22.5 and 30 degrees, in percent.
Both normals must be in the same camera frame (MODUS: x right, y up, z towards the camera).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modus_mega.eval.metrics.arrays import ArrayLike, as_items, check_same_shapes

_MIN_TARGET_NORM = 0.5  # target normals are unit vectors or 0 (invalid)


@dataclass(frozen=True)
class NormalMetrics:
    """Angular-error statistics over all valid pixels."""

    mean_deg: float
    median_deg: float
    within_11_25: float  # percent of pixels with error < 11.25 degrees
    within_22_5: float
    within_30: float
    num_pixels: int


def angular_error_deg(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Angles in degrees between [..., 3] predictions (any length) and unit targets -> [...]."""
    norm = np.linalg.norm(pred, axis=-1, keepdims=True)
    unit = np.where(norm > 0, pred / np.where(norm > 0, norm, 1.0), 0.0)
    cross = np.linalg.norm(np.cross(unit, target), axis=-1)
    dot = (unit * target).sum(-1)
    angle = np.degrees(np.arctan2(cross, dot))
    return np.where(norm[..., 0] > 0, angle, 90.0)


def normal_metrics(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    valid: ArrayLike | Sequence[ArrayLike] | None = None,
) -> NormalMetrics:
    """Mean / median angular error and % within 11.25 / 22.5 / 30 degrees (module protocol).

    ``pred`` and ``target``: [H, W, 3], [N, H, W, 3] or a list of [H, W, 3]; ``valid``: optional
    bool [H, W] masks per image.
    """
    preds, targets = as_items(pred, 3), as_items(target, 3)
    check_same_shapes("normal_metrics", preds, targets)
    masks = as_items(valid, 2) if valid is not None else [None] * len(targets)
    errors = []
    for p, n, m in zip(preds, targets, masks):
        p, n = p.astype(np.float64), n.astype(np.float64)
        ok = np.linalg.norm(n, axis=-1) > _MIN_TARGET_NORM
        if m is not None:
            ok &= m.astype(bool)
        unit_target = n[ok] / np.linalg.norm(n[ok], axis=-1, keepdims=True)
        errors.append(angular_error_deg(p[ok], unit_target))
    error = np.concatenate(errors) if errors else np.zeros(0)
    if error.size == 0:
        raise ValueError("normal_metrics: no valid pixel (target normals are all zero or masked out)")
    return NormalMetrics(
        mean_deg=float(error.mean()),
        median_deg=float(np.median(error)),
        within_11_25=float(100.0 * np.mean(error < 11.25)),
        within_22_5=float(100.0 * np.mean(error < 22.5)),
        within_30=float(100.0 * np.mean(error < 30.0)),
        num_pixels=int(error.size),
    )
