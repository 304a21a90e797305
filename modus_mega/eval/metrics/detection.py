"""Detection mAP through pycocotools, and grounding accuracy at IoU 0.5 (RefCOCO protocol).

Detection protocol: COCO's, computed by pycocotools' ``COCOeval`` (bbox) on COCO objects built in
memory: mAP@0.5 and mAP@[.5:.95] (10 IoU thresholds), all areas, at most 100 detections per
image, 101-point interpolated precision, averaged over the categories that have at least one
target box (COCO's rule: predictions of a category absent from every target are not counted).
Generated detections carry no confidence; when ``scores`` is None every box scores 1, and
COCOeval's stable sort then ranks an image's boxes in the order given (generation order).

Grounding protocol (RefCOCO / MDETR): the referring expression is given and exactly one box is
generated for it; it is correct when its IoU with the target box is at least 0.5. A missing
prediction (a row of NaN, e.g. nothing parsable was generated) is wrong.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from modus_mega.eval.metrics.arrays import ArrayLike, to_numpy

GROUNDING_IOU = 0.5


@dataclass(frozen=True)
class Boxes:
    """The boxes of one image: pixels, ``x0 y0 x1 y1`` (x1, y1 exclusive edges, as MODUS writes them)."""

    boxes: ArrayLike  # [n, 4]
    labels: Sequence[Hashable]  # [n] class of each box (ids or names)
    scores: ArrayLike | None = None  # [n] confidences, None for generated boxes


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO bbox mAPs (nan when no image has a target box)."""

    map_50: float
    map_50_95: float


def _xywh(boxes: ArrayLike) -> np.ndarray:
    """[n, 4] x0 y0 x1 y1 -> [n, 4] x y w h (COCO's layout), widths clipped at 0."""
    b = to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], np.maximum(b[:, 2] - b[:, 0], 0), np.maximum(b[:, 3] - b[:, 1], 0)], axis=1)


def _coco(images: Sequence[Boxes], category_ids: dict[Hashable, int], with_scores: bool) -> COCO:
    """An in-memory COCO object holding ``images``' boxes (image id = index)."""
    annotations = []
    for image_id, image in enumerate(images):
        xywh = _xywh(image.boxes)
        if len(xywh) != len(image.labels):
            raise ValueError(f"image {image_id}: {len(xywh)} boxes but {len(image.labels)} labels")
        scores = np.ones(len(xywh)) if image.scores is None else to_numpy(image.scores).reshape(-1)
        for box, label, score in zip(xywh, image.labels, scores):
            annotation = {
                "id": len(annotations) + 1,  # COCO ids start at 1 (0 reads as "unmatched")
                "image_id": image_id,
                "category_id": category_ids[label],
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                "iscrowd": 0,
            }
            if with_scores:
                annotation["score"] = float(score)
            annotations.append(annotation)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in range(len(images))],
        "categories": [{"id": c} for c in category_ids.values()],
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_map(predictions: Sequence[Boxes], targets: Sequence[Boxes]) -> DetectionMetrics:
    """mAP@0.5 and mAP@[.5:.95] of per-image predicted boxes against target boxes (module protocol)."""
    if len(predictions) != len(targets):
        raise ValueError(f"detection_map: {len(predictions)} predicted images for {len(targets)} target images")
    labels = {label for image in (*targets, *predictions) for label in image.labels}
    category_ids = {label: i + 1 for i, label in enumerate(sorted(labels, key=repr))}
    if not any(len(image.labels) for image in targets):
        return DetectionMetrics(map_50=float("nan"), map_50_95=float("nan"))
    evaluator = COCOeval(_coco(targets, category_ids, False), _coco(predictions, category_ids, True), iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return DetectionMetrics(map_50=float(evaluator.stats[1]), map_50_95=float(evaluator.stats[0]))


def box_iou(pred: ArrayLike, target: ArrayLike) -> np.ndarray:
    """IoU [n] of paired boxes [n, 4] (x0 y0 x1 y1); 0 for a NaN or empty box."""
    p, t = to_numpy(pred).astype(np.float64).reshape(-1, 4), to_numpy(target).astype(np.float64).reshape(-1, 4)
    width = np.minimum(p[:, 2], t[:, 2]) - np.maximum(p[:, 0], t[:, 0])
    height = np.minimum(p[:, 3], t[:, 3]) - np.maximum(p[:, 1], t[:, 1])
    intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
    area_p = np.clip(p[:, 2] - p[:, 0], 0, None) * np.clip(p[:, 3] - p[:, 1], 0, None)
    area_t = np.clip(t[:, 2] - t[:, 0], 0, None) * np.clip(t[:, 3] - t[:, 1], 0, None)
    union = area_p + area_t - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)  # NaN > 0 is False


def grounding_accuracy(pred: ArrayLike, target: ArrayLike, threshold: float = GROUNDING_IOU) -> float:
    """Share of expressions whose one generated box [n, 4] has IoU >= ``threshold`` with its target."""
    p, t = to_numpy(pred), to_numpy(target)
    if p.shape != t.shape or p.ndim != 2 or p.shape[-1] != 4:
        raise ValueError(f"grounding_accuracy: expected two [n, 4] arrays, got {p.shape} and {t.shape}")
    if len(t) == 0:
        raise ValueError("grounding_accuracy: no expressions")
    return float(np.mean(box_iou(p, t) >= threshold))
