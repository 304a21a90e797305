"""Scoring one target modality: decode what the model generated, then run that modality's metric.

One row per target modality (``SCORERS``): ``decode`` turns a generated target (a snapped
image [3, H, W] in [-1, 1], or 1D token ids) into the value space of the ground truth, and
``score`` runs the metric of ``eval/metrics`` over all scenes at once. ``headline`` is the
number the table and the heatmap show; the other numbers go to ``results.json``.

| target | headline | metric |
|---|---|---|
| rgb | geneval | GenEval-style checks against the scene's hue-checkable objects (any source) |
| depth | delta1 | AbsRel, delta < 1.25^k, RMSE of the predicted log depth after its scale and shift fit, valid pixels |
| normal | within_30 | mean / median angle, % within 11.25 / 22.5 / 30 degrees, valid pixels |
| seg | miou | semantic mIoU over the suite's classes |
| sam_seg | matched_iou | Hungarian-matched instance IoU |
| canny, sam_edge | f1 | precision / recall / F1 with a 1.5 px tolerance |
| caption | attribute_recall | colour / shape / object / count recall, relation accuracy |
| detection | map_50 | COCO mAP@0.5 and mAP@[.5:.95] (pycocotools) |
| grounding | accuracy | box IoU >= 0.5 for the given expression |
| *_global | knn_top1 | cosine to the truth; leave-one-out k-NN of the scene classes |
| *_local | cosine | cosine to the truth, per patch |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from modus_mega.eval.metrics.captions import caption_metrics
from modus_mega.eval.metrics.depth import depth_metrics
from modus_mega.eval.metrics.detection import Boxes, detection_map, grounding_accuracy
from modus_mega.eval.metrics.edges import edge_metrics
from modus_mega.eval.metrics.features import DEFAULT_K, cosine_similarity, knn_retrieval
from modus_mega.eval.metrics.geneval import geneval_score
from modus_mega.eval.metrics.normals import normal_metrics
from modus_mega.eval.metrics.segmentation import matched_instance_iou, semantic_miou
from modus_mega.eval.suites import EvalScene, SuiteInfo
from modus_mega.inference.generator import GeneratedTarget
from modus_mega.modalities import feature_modalities, modality, pictures
from modus_mega.modalities.values import Detections, Groundings, Payload
from modus_mega.tokenizers import ModalityTokenizers

Scores = dict[str, float]


@dataclass(frozen=True)
class Context:
    """What decoding and scoring read besides the predictions."""

    info: SuiteInfo
    tokenizers: ModalityTokenizers | None  # None for baselines, which decode nothing


Decode = Callable[[GeneratedTarget, EvalScene, Context], Payload]
Score = Callable[[str, Sequence[Payload], Sequence[EvalScene], Context], Scores]


@dataclass(frozen=True)
class Scorer:
    """How one target modality is decoded and scored."""

    decode: Decode
    score: Score
    headline: str  # the key of ``score``'s result shown in tables (higher is better for every headline)
    full_scale: float = 1.0  # the headline's best value (100 for percentages), for the heatmap's colours


def _image(target: GeneratedTarget) -> np.ndarray:
    assert target.image is not None, f"{target.name} has no image"
    return target.image.numpy()  # [3, H, W]


def _decode_depth(target: GeneratedTarget, scene: EvalScene, ctx: Context) -> Payload:
    """The generated normalised log depth [H, W]: affine in log depth, which the metric's fit expects."""
    return _image(target).mean(axis=0)


def _decode_text(target: GeneratedTarget, scene: EvalScene, ctx: Context) -> Payload:
    assert target.ids is not None and ctx.tokenizers is not None
    height, width = ctx.info.image_size
    return ctx.tokenizers.decode(target.name, target.ids, width, height, ctx.info.feature_grid)


def _arrays(values: Sequence[Payload]) -> list[np.ndarray]:
    return [np.asarray(v) for v in values]


def _truths(name: str, scenes: Sequence[EvalScene]) -> list[np.ndarray]:
    return [np.asarray(s.truth[name]) for s in scenes]


def _score_rgb(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    m = geneval_score(_arrays(preds), [s.geneval_facts for s in scenes], ctx.info.palette)
    return {"geneval": m.score, "colour": m.colour_accuracy, "count": m.count_accuracy, "relation": m.relation_accuracy}


def _score_depth(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    m = depth_metrics(_arrays(preds), _truths(name, scenes), [s.valid["depth"] for s in scenes])
    return {k: float(v) for k, v in asdict(m).items() if k != "num_images"}


def _score_normal(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    m = normal_metrics(_arrays(preds), _truths(name, scenes), [s.valid["normal"] for s in scenes])
    return {k: float(v) for k, v in asdict(m).items() if k != "num_pixels"}


def _score_seg(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    return {"miou": semantic_miou(_arrays(preds), _truths(name, scenes), ctx.info.num_classes).miou}


def _score_instances(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    return {"matched_iou": matched_instance_iou(_arrays(preds), _truths(name, scenes))}


def _score_edges(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    return asdict(edge_metrics(_arrays(preds), _truths(name, scenes)))


def _score_caption(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    captions = [p[0] if isinstance(p, list) and p else "" for p in preds]
    m = caption_metrics(captions, [s.facts for s in scenes], ctx.info.vocabulary)
    return {k: float(v) for k, v in asdict(m).items()}


def _boxes(value: Payload) -> Boxes:
    assert isinstance(value, Detections)
    return Boxes(value.boxes, list(value.classes))


def _score_detection(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    return asdict(detection_map([_boxes(p) for p in preds], [_boxes(s.truth[name]) for s in scenes]))


def _score_grounding(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    asked = [(p, s) for p, s in zip(preds, scenes) if isinstance(s.truth.get(name), Groundings)]
    if not asked:
        return {"accuracy": math.nan}
    nan_box = np.full(4, np.nan, np.float32)  # no generated box: wrong
    pred = np.stack([p.boxes[0] if isinstance(p, Groundings) and len(p.boxes) else nan_box for p, _ in asked])
    truth = np.stack([s.truth[name].boxes[0] for _, s in asked])  # type: ignore[union-attr]
    return {"accuracy": grounding_accuracy(pred, truth)}


def _score_features(name: str, preds: Sequence[Payload], scenes: Sequence[EvalScene], ctx: Context) -> Scores:
    pred, truth = np.stack(_arrays(preds)), np.stack(_truths(name, scenes))
    out = {"cosine": cosine_similarity(pred, truth)}
    if modality(name).kind == "feature_global" and len(scenes) > 1:
        labels = np.array([s.scene_class for s in scenes])
        k = max(1, min(DEFAULT_K, len(scenes) // 4))  # small suites: fewer neighbours than the default 10
        m = knn_retrieval(pred, labels, truth, labels, k=k, leave_one_out=True)
        out |= {"knn_top1": m.top1, "knn_top5": m.top5}
    return out


def _decode_image(target: GeneratedTarget, scene: EvalScene, ctx: Context) -> Payload:
    """2D targets other than depth: the modality's inverse rendering."""
    image = _image(target)
    inverse: dict[str, Callable[[], np.ndarray]] = {
        "rgb": lambda: pictures.image_to_rgb(image),
        "normal": lambda: pictures.image_to_normal(image),
        "seg": lambda: pictures.image_to_labels(image, ctx.info.num_classes),
        "sam_seg": lambda: pictures.image_to_labels(image, pictures.SNAP_LABEL_IDS),
        "canny": lambda: pictures.image_to_edges(image),
        "sam_edge": lambda: pictures.image_to_edges(image),
    }
    return inverse[target.name]()


SCORERS: dict[str, Scorer] = {
    "rgb": Scorer(_decode_image, _score_rgb, "geneval"),
    "depth": Scorer(_decode_depth, _score_depth, "delta1"),
    "normal": Scorer(_decode_image, _score_normal, "within_30", 100.0),
    "seg": Scorer(_decode_image, _score_seg, "miou"),
    "sam_seg": Scorer(_decode_image, _score_instances, "matched_iou"),
    "canny": Scorer(_decode_image, _score_edges, "f1"),
    "sam_edge": Scorer(_decode_image, _score_edges, "f1"),
    "caption": Scorer(_decode_text, _score_caption, "attribute_recall"),
    "detection": Scorer(_decode_text, _score_detection, "map_50"),
    "grounding": Scorer(_decode_text, _score_grounding, "accuracy"),
    **{
        n: Scorer(_decode_text, _score_features, "knn_top1" if modality(n).kind == "feature_global" else "cosine")
        for n in feature_modalities()
    },
}
