"""Depth metrics after per-image affine alignment (the MODUS / Marigold zero-shot protocol).

Protocol, per image, on the valid pixels only (target depth > 0 and finite, and the given mask):

1. The prediction is affine-invariant: it is known up to a scale and a shift in some space.
   ``space`` names that space, and the least-squares fit ``a * pred + b ~ f(target)`` is made in
   it: ``log_depth`` (f = log d; the default, because MODUS's depth modality is log-depth
   normalised per image to [-1, 1] (``data/render.py``), so the channel mean of a generated depth
   image is exactly affine in log depth and the fit recovers the unknown near / far range),
   ``depth`` (f = d; Marigold's alignment of affine-invariant depth) or ``inverse_depth``
   (f = 1 / d; MiDaS / DPT disparity).
2. The aligned prediction is mapped back to metres and clipped to [min_depth, max_depth].
3. AbsRel = mean |p - d| / d; delta_k = share of pixels with max(p / d, d / p) < 1.25^k
   (k = 1, 2, 3); RMSE = sqrt(mean (p - d)^2), in metres.

Metrics are averaged over images (each image weighs the same, as Marigold reports them);
images without valid pixels are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from modus_mega.eval.metrics.arrays import ArrayLike, as_items, check_same_shapes

DepthSpace = Literal["log_depth", "depth", "inverse_depth"]
_SPACES: tuple[str, ...] = ("log_depth", "depth", "inverse_depth")
_MIN_DISPARITY = 1e-8  # aligned disparity floor before inversion (a non-positive one is "far")


@dataclass(frozen=True)
class DepthMetrics:
    """Depth metrics averaged over images (lower is better for abs_rel and rmse)."""

    abs_rel: float
    delta1: float  # share of pixels within a factor 1.25
    delta2: float  # ... 1.25^2
    delta3: float  # ... 1.25^3
    rmse: float  # metres
    num_images: int  # images with at least one valid pixel


def _to_space(depth: np.ndarray, space: str) -> np.ndarray:
    if space == "log_depth":
        return np.log(depth)
    if space == "inverse_depth":
        return 1.0 / depth
    return depth


def _from_space(values: np.ndarray, space: str) -> np.ndarray:
    if space == "log_depth":
        return np.exp(values)
    if space == "inverse_depth":
        return 1.0 / np.maximum(values, _MIN_DISPARITY)
    return values


def align_affine(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``a * pred + b`` with (a, b) minimising the squared error to ``target`` (both [P]).

    A constant prediction has no unique scale; the minimum-norm solution then predicts the
    target's mean, as ``numpy.linalg.lstsq`` does.
    """
    design = np.stack([pred, np.ones_like(pred)], axis=1)  # [P, 2]
    (scale, shift), *_ = np.linalg.lstsq(design, target, rcond=None)
    return scale * pred + shift


def depth_metrics(
    pred: ArrayLike | Sequence[ArrayLike],
    target: ArrayLike | Sequence[ArrayLike],
    valid: ArrayLike | Sequence[ArrayLike] | None = None,
    space: DepthSpace = "log_depth",
    min_depth: float = 1e-3,
    max_depth: float | None = None,
) -> DepthMetrics:
    """AbsRel, delta1-3 and RMSE of affine-invariant predictions against metric depth.

    ``pred``: [H, W], [N, H, W] or a list of [H, W], affine-invariant in ``space``;
    ``target``: metric depth of the same shapes, 0 (or non-finite) where unknown;
    ``valid``: optional bool masks of the same shapes, ANDed with the target's own validity.
    The protocol is the module docstring's.
    """
    if space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES}, got {space!r}")
    preds, targets = as_items(pred, 2), as_items(target, 2)
    check_same_shapes("depth_metrics", preds, targets)
    masks = as_items(valid, 2) if valid is not None else [None] * len(targets)
    rows: list[tuple[float, float, float, float, float]] = []
    for p, d, m in zip(preds, targets, masks):
        p, d = p.astype(np.float64), d.astype(np.float64)
        ok = np.isfinite(d) & (d > 0) & np.isfinite(p)
        if m is not None:
            ok &= m.astype(bool)
        if not ok.any():
            continue
        gt = d[ok]
        aligned = _from_space(align_affine(p[ok], _to_space(gt, space)), space)
        est = np.clip(aligned, min_depth, max_depth if max_depth is not None else np.inf)
        ratio = np.maximum(est / gt, gt / est)
        rows.append(
            (
                float(np.mean(np.abs(est - gt) / gt)),
                float(np.mean(ratio < 1.25)),
                float(np.mean(ratio < 1.25**2)),
                float(np.mean(ratio < 1.25**3)),
                float(np.sqrt(np.mean((est - gt) ** 2))),
            )
        )
    if not rows:
        raise ValueError("depth_metrics: no image has a valid pixel (target depth > 0 inside the mask)")
    means = np.mean(np.array(rows), axis=0)
    return DepthMetrics(*(float(v) for v in means), num_images=len(rows))
