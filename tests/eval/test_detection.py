"""Detection mAP (pycocotools) by hand and against faster-coco-eval; grounding accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from faster_coco_eval import COCO, COCOeval_faster
from pycocotools import mask as coco_mask

from modus_mega.eval.metrics.detection import Boxes, box_iou, detection_map, grounding_accuracy


def _random_images(rng: np.random.Generator, num_images: int) -> list[Boxes]:
    images = []
    for _ in range(num_images):
        n = int(rng.integers(1, 6))
        corner = rng.uniform(0, 50, size=(n, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(5, 30, size=(n, 2))], axis=1)
        images.append(Boxes(boxes, [int(c) for c in rng.integers(0, 3, size=n)], rng.random(n)))
    return images


def _jitter(rng: np.random.Generator, image: Boxes) -> Boxes:
    boxes = np.asarray(image.boxes) + rng.normal(0, 3, size=np.shape(image.boxes))
    return Boxes(boxes, image.labels, image.scores)


def test_ground_truth_is_perfect_and_shuffled_is_worse() -> None:
    targets = _random_images(np.random.default_rng(0), 6)
    perfect = detection_map(targets, targets)
    assert (perfect.map_50, perfect.map_50_95) == (1.0, 1.0)
    shuffled = detection_map(targets[1:] + targets[:1], targets)
    assert shuffled.map_50 < 0.3


def test_hand_computed_iou_thresholds_classes_and_ranking() -> None:
    target = [Boxes(np.array([[0, 0, 10, 10]]), ["cube"])]
    # IoU 0.62 passes the thresholds 0.5, 0.55 and 0.6 of ten
    m = detection_map([Boxes(np.array([[0, 0, 10, 6.2]]), ["cube"])], target)
    assert m.map_50 == pytest.approx(1.0) and m.map_50_95 == pytest.approx(0.3)
    # a false positive ranked first halves the interpolated precision at every recall level
    wrong_first = Boxes(np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), ["cube", "cube"])
    assert detection_map([wrong_first], target).map_50 == pytest.approx(0.5)
    # without scores the boxes rank in the given (generation) order
    right_first = Boxes(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), ["cube", "cube"])
    assert detection_map([right_first], target).map_50 == pytest.approx(1.0)
    # two classes, one found, one missed (wrong class): mean over the classes with targets
    two = [Boxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), ["cube", "sphere"])]
    found_one = [Boxes(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), ["cube", "cylinder"])]
    assert detection_map(found_one, two).map_50 == pytest.approx(0.5)
    assert detection_map([Boxes(np.zeros((0, 4)), [])], target).map_50 == 0.0


def _faster_coco_eval(preds: list[Boxes], targets: list[Boxes]) -> tuple[float, float]:
    """(mAP@0.5, mAP@[.5:.95]) from faster-coco-eval, fed the usual way: a dataset dict and a result list."""

    def xywh(box: np.ndarray) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    annotations = []
    for i, t in enumerate(targets):
        for box, label in zip(np.asarray(t.boxes), t.labels):
            x, y, w, h = xywh(box)
            annotation = {"id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1}
            annotations.append(annotation | {"bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    gt = COCO()
    images, categories = [{"id": i} for i in range(len(targets))], [{"id": c} for c in (1, 2, 3)]
    gt.dataset = {"images": images, "categories": categories, "annotations": annotations}
    gt.createIndex()
    results = [
        {"image_id": i, "category_id": int(label) + 1, "bbox": xywh(box), "score": float(score)}
        for i, p in enumerate(preds)
        for box, label, score in zip(np.asarray(p.boxes), p.labels, p.scores)
    ]
    evaluator = COCOeval_faster(gt, gt.loadRes(results), iouType="bbox", print_function=lambda *_: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[1]), float(evaluator.stats[0])


def test_matches_faster_coco_eval() -> None:
    rng = np.random.default_rng(1)
    targets = _random_images(rng, 8)
    preds = [_jitter(rng, t) for t in targets]
    preds[0] = _random_images(rng, 1)[0]  # some wrong boxes too
    map_50, map_50_95 = _faster_coco_eval(preds, targets)
    m = detection_map(preds, targets)
    assert m.map_50 == pytest.approx(map_50, abs=1e-6)
    assert m.map_50_95 == pytest.approx(map_50_95, abs=1e-6)
    assert 0.0 < m.map_50_95 < m.map_50 < 1.0  # a case that is neither trivial nor perfect


def test_box_iou_matches_pycocotools_and_grounding_accuracy() -> None:
    rng = np.random.default_rng(2)
    corner = rng.uniform(0, 20, size=(50, 2))
    a = np.concatenate([corner, corner + rng.uniform(1, 20, size=(50, 2))], axis=1)
    b = a + rng.normal(0, 4, size=a.shape)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 0.5)
    xywh = lambda x: np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], axis=1)  # noqa: E731
    reference = np.diag(coco_mask.iou(xywh(a).tolist(), xywh(b).tolist(), [0] * len(b)))
    np.testing.assert_allclose(box_iou(a, b), reference, rtol=1e-9)
    assert grounding_accuracy(b, b) == 1.0
    assert grounding_accuracy(a, b) == pytest.approx(np.mean(reference >= 0.5))
    assert grounding_accuracy(np.roll(a, 1, axis=0), a) < 0.2
    # IoU exactly 0.5 counts; a missing box (NaN) does not
    target = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    pred = np.array([[0.0, 0, 10, 5], [np.nan] * 4])
    assert grounding_accuracy(pred, target) == 0.5
