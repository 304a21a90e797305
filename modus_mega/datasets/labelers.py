"""Pseudo-labelers: models from LOCAL weight directories that label real images for MODUS.

Each labeler is a small class with one job: it reads one modality of a batch of samples (rgb,
or depth for the normals) and returns, per sample, the modality values it produced (the
``RawSample`` value types of ``data/shard_format.py``) or the reason it produced nothing. Models load
with ``local_files_only=True`` from a directory written by ``save_pretrained`` (or
``huggingface-cli download REPO --local-dir DIR``); nothing is fetched from the network.

| labeler | model class (transformers) | modalities |
|---|---|---|
| ``DepthLabeler`` | ``AutoModelForDepthEstimation`` (DPT, Depth Anything, ZoeDepth, GLPN) | depth |
| ``NormalFromDepth`` | none: finite differences of the back-projected depth | normal |
| ``SegmentationLabeler`` | ``AutoModelForSemanticSegmentation`` (SegFormer, UperNet, BEiT, DPT) | seg |
| ``SamLabeler`` | ``SamModel`` with automatic mask generation (a point grid) | sam_seg, sam_edge |
| ``DetectionLabeler`` | ``AutoModelForObjectDetection`` (DETR family, RT-DETR, YOLOS) | detection |
| ``Dinov2Labeler`` | ``AutoModel`` of a DINOv2 checkpoint (``Dinov2Model``, with registers too) | dinov2_global, dinov2_local |
| ``ClipLabeler`` | ``CLIPVisionModelWithProjection`` | clip_global |
| ``CaptionLabeler`` | ``AutoModelForImageTextToText`` + its tokenizer (BLIP, GIT, ViT-GPT2) | caption |

Conventions are those of ``docs/DATA.md``: depth is z-depth in metres-like units, 0 where
invalid; normals are unit vectors in the camera frame x right, y up, z towards the camera;
boxes are continuous pixel coordinates ``x0 y0 x1 y1``; local feature grids are row-major
from the top left and cover the whole image.

Shapes: B batch, H x W image, h x w model output grid, C classes, D feature width, P prompt
points, K masks per point (3 for SAM), N boxes or masks.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from modus_mega.modalities.values import Detections, Payload

# Skip reasons a labeler reports for one sample (they appear in the build summary).
EMPTY_OUTPUT = "empty_output"  # the model produced nothing usable (an empty caption)
DEGENERATE_DEPTH = "degenerate_depth"  # a relative depth map with no contrast, or no valid pixel
NONFINITE = "nonfinite"  # NaN or inf in a feature vector
NO_VALID_NORMAL = "no_valid_normal"  # no pixel had valid depth neighbours


@dataclass
class Labels:
    """What a labeler produced for one sample: values, and reasons for what it did not produce."""

    values: dict[str, Payload] = field(default_factory=dict)  # modality -> RawSample value type
    skipped: dict[str, str] = field(default_factory=dict)  # modality -> reason it is missing


class Labeler(abc.ABC):
    """One pseudo-labeler: reads ``source`` of each sample, writes ``modalities``."""

    name: ClassVar[str]  # the name used on the command line (--labelers)
    modalities: ClassVar[tuple[str, ...]]  # the modalities it writes
    source: ClassVar[str] = "rgb"  # the modality it reads

    @abc.abstractmethod
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """Label a batch of ``source`` values (rgb: uint8 [H, W, 3]); one ``Labels`` per input."""

    def provenance(self) -> dict[str, Any]:
        """What produced the labels (stored in the dataset's index.json)."""
        return {"labeler": type(self).__name__}


@dataclass
class LabelerOptions:
    """Inference settings shared by all labelers, and the knobs of the ones that have any."""

    device: str = "cpu"  # torch device the models run on
    dtype: torch.dtype = torch.float32  # model weights / activations dtype (outputs are float32)
    depth_kind: str = "auto"  # "metric", "relative" (disparity), or "auto": from the model config
    relative_depth_range: tuple[float, float] = (1.0, 50.0)  # (near, far) metres a relative map is pinned to
    fov_degrees: float = 60.0  # assumed horizontal field of view for normals from depth
    detection_threshold: float = 0.5  # minimum detection score kept
    max_detections: int = 100  # at most this many boxes per image, highest scores first
    caption_max_new_tokens: int = 30  # generation length limit of the captioner
    caption_num_beams: int = 1  # beam search width of the captioner (1 = greedy)
    sam_points_per_side: int = 32  # SAM automatic masks: a points_per_side^2 prompt grid
    sam_points_per_batch: int = 64  # prompt points decoded at once (memory: P * 3 * H * W floats)
    sam_pred_iou_threshold: float = 0.88  # keep masks whose predicted IoU exceeds this
    sam_stability_threshold: float = 0.95  # keep masks whose stability score exceeds this
    sam_stability_offset: float = 1.0  # logit offset of the stability score
    sam_nms_threshold: float = 0.7  # box IoU above which the lower-scoring mask is dropped


# ----------------------------------------------------------------------------- helpers


def _size_field(size: Any, key: str) -> int | None:
    """``size[key]`` of an image processor's ``size`` / ``crop_size`` (dict or SizeDict)."""
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _square_resolution(processor: Any) -> int:
    """The square input side a processor's model expects (its crop, else its resize target)."""
    size = getattr(processor, "size", None)
    candidates = [_size_field(size, key) for key in ("height", "shortest_edge", "longest_edge")]
    if getattr(processor, "do_center_crop", False):
        candidates.insert(0, _size_field(getattr(processor, "crop_size", None), "height"))
    for side in candidates:
        if side:
            return side
    raise ValueError(f"cannot tell the input resolution of image processor {type(processor).__name__} (size={size})")


def _load(auto_class: Any, weights: Path, what: str, options: LabelerOptions) -> Any:
    """``auto_class.from_pretrained(weights)`` offline, in eval mode on the options' device."""
    try:
        model = auto_class.from_pretrained(str(weights), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"cannot load the {what} model from {weights} with {auto_class.__name__} ({err}); "
            "the directory must hold a transformers checkpoint (config.json + weights) of a supported class"
        ) from err
    return model.to(device=options.device, dtype=options.dtype).eval()


def _load_processor(weights: Path, what: str) -> Any:
    """The image processor saved next to the model (preprocessor_config.json), offline."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(weights), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load the {what} image processor from {weights} ({err}); save it with the model") from err


def _pixel_values(
    processor: Any, images: Sequence[np.ndarray], options: LabelerOptions, **overrides: Any
) -> torch.Tensor:
    """Preprocessed batch [B, 3, h, w] on the model's device and dtype."""
    batch = processor(images=list(images), return_tensors="pt", **overrides)
    return batch["pixel_values"].to(device=options.device, dtype=options.dtype)


def _whole_image_pixels(processor: Any, images: Sequence[np.ndarray], options: LabelerOptions) -> torch.Tensor:
    """[B, 3, R, R]: each (square) image resized whole to the model's resolution, no centre crop.

    Feature grids must cover the whole image (docs/DATA.md), so the centre crop that
    DINOv2's and CLIP's processors apply after a larger resize is replaced by a direct resize.
    """
    side = _square_resolution(processor)
    return _pixel_values(processor, images, options, do_center_crop=False, size={"height": side, "width": side})


def _finite_features(values: dict[str, np.ndarray]) -> Labels:
    """Feature values as ``Labels``; a non-finite one is reported instead of stored."""
    labels = Labels()
    for name, value in values.items():
        if np.isfinite(value).all():
            labels.values[name] = value.astype(np.float32)
        else:
            labels.skipped[name] = NONFINITE
    return labels


# ----------------------------------------------------------------------------- geometry


def relative_to_depth(disparity: np.ndarray, near: float, far: float) -> np.ndarray | None:
    """Metres-like depth [H, W] from a relative (affine-invariant) disparity map [H, W].

    Monocular relative models (MiDaS-style DPT, Depth Anything) predict inverse depth up to an
    unknown scale and shift. Pinning the image's disparity range to ``[1 / far, 1 / near]``
    (largest disparity -> ``near`` metres, smallest -> ``far``) fixes both, so the result has
    the right ordering and plausible magnitudes but is not metric. Non-finite pixels are 0
    (invalid). Returns None when the map has no contrast (the scale would be undefined).
    """
    if not 0.0 < near < far:
        raise ValueError(f"relative depth range needs 0 < near < far, got near={near}, far={far}")
    finite = np.isfinite(disparity)
    if not finite.any():
        return None
    low, high = float(disparity[finite].min()), float(disparity[finite].max())
    if high - low <= 1e-6 * max(abs(high), abs(low), 1.0):
        return None
    unit = np.where(finite, (disparity - low) / (high - low), 0.0)  # 1 nearest, 0 farthest
    inverse = 1.0 / far + unit * (1.0 / near - 1.0 / far)
    return np.where(finite, 1.0 / inverse, 0.0).astype(np.float32)


def _pinhole_points(depth: np.ndarray, fov_degrees: float) -> np.ndarray:
    """Back-projected points [H, W, 3] in the OpenCV camera frame (x right, y down, z forward).

    Square pixels, principal point at the image centre, focal length from the horizontal FOV;
    pixel (i, j) is sampled at its centre (j + 0.5, i + 0.5).
    """
    height, width = depth.shape
    focal = (width / 2.0) / math.tan(math.radians(fov_degrees) / 2.0)
    u = (np.arange(width) + 0.5 - width / 2.0) / focal
    v = (np.arange(height) + 0.5 - height / 2.0) / focal
    return np.stack(np.broadcast_arrays(depth * u[None, :], depth * v[:, None], depth), axis=-1)


def _tangent(points: np.ndarray, valid: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Finite-difference tangent [H, W, 3] along ``axis`` (1: columns, 0: rows) and its validity.

    Of the forward and backward differences, the one with the smaller depth step is used, so a
    pixel at an occlusion boundary takes its tangent from its own surface, not across the gap.
    """
    forward = np.zeros_like(points)
    backward = np.zeros_like(points)
    ok_forward = np.zeros_like(valid)
    ok_backward = np.zeros_like(valid)
    head = [slice(None)] * 2
    tail = [slice(None)] * 2
    head[axis], tail[axis] = slice(None, -1), slice(1, None)
    head_, tail_ = tuple(head), tuple(tail)
    step = points[tail_] - points[head_]
    pair_ok = valid[tail_] & valid[head_]
    forward[head_], ok_forward[head_] = step, pair_ok  # pixel k: P[k + 1] - P[k]
    backward[tail_], ok_backward[tail_] = step, pair_ok  # pixel k: P[k] - P[k - 1]
    use_forward = ok_forward & (~ok_backward | (np.abs(forward[..., 2]) <= np.abs(backward[..., 2])))
    return np.where(use_forward[..., None], forward, backward), ok_forward | ok_backward


def normals_from_depth(
    depth: np.ndarray, valid: np.ndarray, fov_degrees: float
) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals [H, W, 3] (x right, y up, z towards the camera) of a z-depth map [H, W].

    Pixels are back-projected under a pinhole camera with the given horizontal FOV; the
    normal is the cross product of the row and column tangents, turned to face the camera.
    Returns the normals (0 where invalid) and their validity [H, W]: a pixel needs valid depth
    and a valid neighbour along both axes. With relative depth the normals are only as good
    as the assumed FOV and the pinned scale (the shift of a disparity map bends planes).
    """
    points = _pinhole_points(depth.astype(np.float64), fov_degrees)  # [H, W, 3]
    tangent_u, ok_u = _tangent(points, valid, axis=1)
    tangent_v, ok_v = _tangent(points, valid, axis=0)
    normal = np.cross(tangent_u, tangent_v)  # OpenCV frame
    norm = np.linalg.norm(normal, axis=-1)
    ok = valid & ok_u & ok_v & (norm > 1e-12)
    normal = normal / np.maximum(norm, 1e-12)[..., None]
    facing = np.where((normal * points).sum(-1) > 0, -1.0, 1.0)  # visible surfaces have n . ray < 0
    normal = normal * facing[..., None] * np.array([1.0, -1.0, -1.0])  # OpenCV -> x right, y up, z back
    return np.where(ok[..., None], normal, 0.0).astype(np.float32), ok


# ----------------------------------------------------------------------------- labelers


class DepthLabeler(Labeler):
    """Monocular depth from an ``AutoModelForDepthEstimation`` checkpoint, stored in metres.

    Metric models (Depth Anything "metric", ZoeDepth, GLPN) output metres and are kept as is
    (non-positive or non-finite pixels invalid). Relative models (DPT-MiDaS, Depth Anything
    "relative") output affine-invariant disparity, converted by ``relative_to_depth``.
    """

    name = "depth"
    modalities = ("depth",)
    _METRIC_MODEL_TYPES = ("zoedepth", "glpn")  # model types whose output is metres

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import AutoModelForDepthEstimation

        near, far = options.relative_depth_range
        if not 0.0 < near < far:
            raise ValueError(f"relative depth range needs 0 < near < far, got near={near}, far={far}")
        self.options = options
        self.model = _load(AutoModelForDepthEstimation, weights, "depth", options)
        self.processor = _load_processor(weights, "depth")
        config = self.model.config
        if options.depth_kind == "auto":
            metric = getattr(config, "depth_estimation_type", None) == "metric"
            self.kind = "metric" if metric or config.model_type in self._METRIC_MODEL_TYPES else "relative"
        elif options.depth_kind in ("metric", "relative"):
            self.kind = options.depth_kind
        else:
            raise ValueError(f"depth_kind must be 'auto', 'metric' or 'relative', got {options.depth_kind!r}")

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """Depth [H, W] float32 metres (0 = invalid) for each rgb image."""
        outputs = self.model(pixel_values=_pixel_values(self.processor, inputs, self.options))
        sizes = [image.shape[:2] for image in inputs]
        outputs.predicted_depth = outputs.predicted_depth.float()  # [B, h, w]; resampled in float32
        post_process = getattr(self.processor, "post_process_depth_estimation", None)
        if post_process is not None:  # it also removes the padding of models that pad (ZoeDepth)
            extra = {"source_sizes": sizes} if "source_sizes" in inspect.signature(post_process).parameters else {}
            maps = [r["predicted_depth"] for r in post_process(outputs, target_sizes=sizes, **extra)]
        else:
            maps = [
                F.interpolate(d[None, None], size=s, mode="bilinear", align_corners=False)[0, 0]
                for d, s in zip(outputs.predicted_depth, sizes)
            ]
        results = []
        for prediction in maps:
            depth = self._to_metres(prediction.float().cpu().numpy())  # [H, W]
            if depth is None:
                results.append(Labels(skipped={"depth": DEGENERATE_DEPTH}))
            else:
                results.append(Labels(values={"depth": depth}))
        return results

    def _to_metres(self, raw: np.ndarray) -> np.ndarray | None:
        """Depth [H, W] in metres (0 = invalid) from the model's map, None if it has no usable pixel."""
        if self.kind == "relative":
            return relative_to_depth(raw, *self.options.relative_depth_range)
        depth = np.where(np.isfinite(raw) & (raw > 0), raw, 0.0).astype(np.float32)
        return depth if (depth > 0).any() else None

    def provenance(self) -> dict[str, Any]:
        """Model type and how its output became metres."""
        info = {"labeler": type(self).__name__, "model_type": self.model.config.model_type, "kind": self.kind}
        if self.kind == "relative":
            info["relative_depth_range"] = list(self.options.relative_depth_range)
        return info


class NormalFromDepth(Labeler):
    """Surface normals derived from the predicted depth (``normals_from_depth``); no model."""

    name = "normal"
    modalities = ("normal",)
    source = "depth"

    def __init__(self, options: LabelerOptions) -> None:
        if not 0.0 < options.fov_degrees < 180.0:
            raise ValueError(f"fov_degrees must lie in (0, 180), got {options.fov_degrees}")
        self.fov_degrees = options.fov_degrees

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """Normals [H, W, 3] float32 (0 where invalid) for each depth map [H, W] (0 = invalid)."""
        results = []
        for depth in inputs:
            normal, ok = normals_from_depth(depth, depth > 0, self.fov_degrees)
            labels = Labels(values={"normal": normal}) if ok.any() else Labels(skipped={"normal": NO_VALID_NORMAL})
            results.append(labels)
        return results

    def provenance(self) -> dict[str, Any]:
        """The assumed camera."""
        return {"labeler": type(self).__name__, "fov_degrees": self.fov_degrees}


class SegmentationLabeler(Labeler):
    """Semantic class ids from an ``AutoModelForSemanticSegmentation`` checkpoint.

    Logits [B, C, h, w] are upsampled bilinearly to the image and arg-maxed; the class names
    (``config.id2label``) go into the index provenance.
    """

    name = "seg"
    modalities = ("seg",)

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import AutoModelForSemanticSegmentation

        self.options = options
        self.model = _load(AutoModelForSemanticSegmentation, weights, "segmentation", options)
        self.processor = _load_processor(weights, "segmentation")

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """Class ids [H, W] int32 for each rgb image."""
        pixels = _pixel_values(self.processor, inputs, self.options)
        logits = self.model(pixel_values=pixels).logits.float()  # [B, C, h, w]
        results = []
        for image, logit in zip(inputs, logits):
            upsampled = F.interpolate(logit[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            results.append(Labels(values={"seg": upsampled.argmax(0).to(torch.int32).cpu().numpy()}))  # [H, W]
        return results

    def provenance(self) -> dict[str, Any]:
        """Model type and the class names of the ids."""
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        return {"labeler": type(self).__name__, "model_type": self.model.config.model_type, "classes": id2label}


class Dinov2Labeler(Labeler):
    """DINOv2 features: the final CLS token (global) and the patch-token grid (local).

    Both are taken from ``last_hidden_state`` (after the final layer norm): CLS [D] and the
    patch tokens [gh, gw, D], register tokens (if any) dropped. The whole image is resized to
    the processor's crop size, so the grid covers it.
    """

    name = "dinov2"
    modalities = ("dinov2_global", "dinov2_local")

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import AutoModel

        self.options = options
        self.model = _load(AutoModel, weights, "DINOv2", options)
        self.processor = _load_processor(weights, "DINOv2")
        if not self.model.config.model_type.startswith("dinov2"):
            raise ValueError(
                f"{weights} holds a {self.model.config.model_type!r} model; the dinov2 labeler needs a DINOv2 checkpoint"
            )

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """``dinov2_global`` [D] and ``dinov2_local`` [gh, gw, D] float32 per rgb image."""
        pixels = _whole_image_pixels(self.processor, inputs, self.options)  # [B, 3, R, R]
        tokens = self.model(pixel_values=pixels).last_hidden_state.float()  # [B, 1 + registers + gh * gw, D]
        patch = self.model.config.patch_size
        grid_h, grid_w = pixels.shape[2] // patch, pixels.shape[3] // patch
        first_patch = 1 + getattr(self.model.config, "num_register_tokens", 0)
        local = tokens[:, first_patch:].reshape(len(inputs), grid_h, grid_w, -1).cpu().numpy()
        cls = tokens[:, 0].cpu().numpy()
        return [_finite_features({"dinov2_global": g, "dinov2_local": l}) for g, l in zip(cls, local)]

    def provenance(self) -> dict[str, Any]:
        """Model type and the feature width."""
        config = self.model.config
        return {"labeler": type(self).__name__, "model_type": config.model_type, "dim": config.hidden_size}


class ClipLabeler(Labeler):
    """CLIP image embedding (``CLIPVisionModelWithProjection.image_embeds``), L2-normalised.

    Normalised because CLIP compares embeddings by cosine similarity; the norm carries no
    meaning the model was trained to give it.
    """

    name = "clip"
    modalities = ("clip_global",)

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import CLIPVisionModelWithProjection

        self.options = options
        self.model = _load(CLIPVisionModelWithProjection, weights, "CLIP", options)
        self.processor = _load_processor(weights, "CLIP")

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """``clip_global`` [D] float32, unit norm, per rgb image."""
        pixels = _whole_image_pixels(self.processor, inputs, self.options)
        embeds = self.model(pixel_values=pixels).image_embeds.float()  # [B, D]
        embeds = F.normalize(embeds, dim=-1).cpu().numpy()
        return [_finite_features({"clip_global": e}) for e in embeds]

    def provenance(self) -> dict[str, Any]:
        """The embedding width."""
        return {"labeler": type(self).__name__, "dim": self.model.config.projection_dim, "normalised": True}


class CaptionLabeler(Labeler):
    """One caption per image from an image-to-text model (``AutoModelForImageTextToText``).

    Unconditional captioners only (BLIP, GIT, ViT-GPT2): the image is the whole prompt. The
    generated ids are decoded with the tokenizer saved next to the model, special tokens
    removed; an empty caption is reported, not stored.
    """

    name = "caption"
    modalities = ("caption",)

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        self.options = options
        self.model = _load(AutoModelForImageTextToText, weights, "caption", options)
        self.processor = _load_processor(weights, "caption")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(weights), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"cannot load the caption tokenizer from {weights} ({err}); save it with the model") from err

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """``caption`` [one string] per rgb image."""
        ids = self.model.generate(
            pixel_values=_pixel_values(self.processor, inputs, self.options),
            max_new_tokens=self.options.caption_max_new_tokens,
            num_beams=self.options.caption_num_beams,
            do_sample=False,
        )
        texts = [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return [Labels(values={"caption": [t]}) if t else Labels(skipped={"caption": EMPTY_OUTPUT}) for t in texts]

    def provenance(self) -> dict[str, Any]:
        """Model type and the decoding settings."""
        return {
            "labeler": type(self).__name__,
            "model_type": self.model.config.model_type,
            "max_new_tokens": self.options.caption_max_new_tokens,
            "num_beams": self.options.caption_num_beams,
        }


class DetectionLabeler(Labeler):
    """Boxes with class names from an ``AutoModelForObjectDetection`` checkpoint.

    The processor's ``post_process_object_detection`` gives boxes in pixels of the image;
    they are clipped to it, boxes with no area are dropped, and the highest-scoring
    ``max_detections`` at or above ``detection_threshold`` are kept (none is a valid answer).
    """

    name = "detection"
    modalities = ("detection",)

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import AutoModelForObjectDetection

        self.options = options
        self.model = _load(AutoModelForObjectDetection, weights, "detection", options)
        self.processor = _load_processor(weights, "detection")

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """``detection`` (``Detections``) per rgb image."""
        outputs = self.model(pixel_values=_pixel_values(self.processor, inputs, self.options))
        sizes = [image.shape[:2] for image in inputs]
        threshold = self.options.detection_threshold
        found = self.processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
        id2label = self.model.config.id2label
        results = []
        for (height, width), result in zip(sizes, found):
            scores = result["scores"].float().cpu().numpy()  # [N]
            boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)  # [N, 4] x0 y0 x1 y1
            labels = result["labels"].cpu().numpy()  # [N]
            boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float32))
            has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            keep = np.isfinite(boxes).all(1) & np.isfinite(scores) & has_area
            order = [i for i in np.argsort(-scores, kind="stable") if keep[i]][: self.options.max_detections]
            detections = Detections(
                boxes=boxes[order].astype(np.float32).reshape(-1, 4),
                classes=[str(id2label.get(int(labels[i]), int(labels[i]))) for i in order],
                scores=scores[order].astype(np.float32),
                width=width,
                height=height,
            )
            results.append(Labels(values={"detection": detections}))
        return results

    def provenance(self) -> dict[str, Any]:
        """Model type and the filtering settings."""
        return {
            "labeler": type(self).__name__,
            "model_type": self.model.config.model_type,
            "threshold": self.options.detection_threshold,
            "max_detections": self.options.max_detections,
        }


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes [N, 4], best score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds
    ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    boxes = boxes.astype(np.float64)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    kept: list[int] = []
    suppressed = np.zeros(len(boxes), dtype=bool)
    for index in order:
        if suppressed[index]:
            continue
        kept.append(int(index))
        top_left = np.maximum(boxes[index, :2], boxes[:, :2])
        bottom_right = np.minimum(boxes[index, 2:], boxes[:, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        iou = inter / np.maximum(area[index] + area - inter, 1e-12)
        suppressed |= iou > iou_threshold
    return np.asarray(kept, dtype=np.int64)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes [N, 4] (x0 y0 x1 y1, pixel edges) of non-empty binary masks [N, H, W]."""
    rows, cols = masks.any(2), masks.any(1)  # [N, H], [N, W]
    x0, y0 = cols.argmax(1), rows.argmax(1)
    x1, y1 = cols.shape[1] - cols[:, ::-1].argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def paint_instances(masks: np.ndarray) -> np.ndarray:
    """Instance ids [H, W] int32 from overlapping binary masks [N, H, W].

    Masks are painted largest first, so a smaller mask on top of a larger one (a part on its
    object) stays visible; ids are 1..n in painting order over the masks that kept a pixel,
    0 where no mask covers.
    """
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    areas = masks.reshape(len(masks), -1).sum(1)
    for rank, index in enumerate(np.argsort(-areas, kind="stable")):
        labels[masks[index]] = rank + 1
    _, dense = np.unique(labels, return_inverse=True)  # renumber the ids that survived
    dense = dense.reshape(labels.shape).astype(np.int32)
    return dense if labels.min() == 0 else dense + 1


def instance_boundaries(labels: np.ndarray) -> np.ndarray:
    """bool [H, W]: pixels whose right or lower neighbour has another id (synth's sam_edge rule)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


class SamLabeler(Labeler):
    """SAM automatic mask generation -> an instance map (sam_seg) and its edges (sam_edge).

    A ``points_per_side^2`` grid of single-point prompts; each point yields 3 masks (SAM's
    multimask output) with a predicted IoU. Masks are kept if that IoU and the stability
    score (IoU of the mask thresholded at logit +offset and -offset) pass their thresholds,
    then de-duplicated by box NMS and painted by ``paint_instances``. One crop layer, no
    small-region post-processing (the SAM paper's defaults otherwise).
    """

    name = "sam"
    modalities = ("sam_seg", "sam_edge")

    def __init__(self, weights: Path, options: LabelerOptions) -> None:
        from transformers import SamModel

        if options.sam_points_per_side < 1 or options.sam_points_per_batch < 1:
            raise ValueError("sam_points_per_side and sam_points_per_batch must be positive")
        self.options = options
        self.model = _load(SamModel, weights, "SAM", options)
        self.processor = _load_processor(weights, "SAM")

    def _masks(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Kept masks [N, H, W] bool and their predicted IoU [N] for one rgb image [H, W, 3]."""
        options = self.options
        height, width = image.shape[:2]
        batch = self.processor(images=[image], return_tensors="pt")
        pixels = batch["pixel_values"].to(device=options.device, dtype=options.dtype)  # [1, 3, L, L] padded
        resized_h, resized_w = (int(v) for v in batch["reshaped_input_sizes"][0])
        embeddings = self.model.get_image_embeddings(pixels)
        side = options.sam_points_per_side
        offsets = (np.arange(side) + 0.5) / side
        grid = np.stack(np.meshgrid(offsets * resized_w, offsets * resized_h), axis=-1).reshape(-1, 2)  # [P, 2] x, y
        masks: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        for start in range(0, len(grid), options.sam_points_per_batch):
            chunk = grid[start : start + options.sam_points_per_batch]
            points = torch.as_tensor(chunk, device=options.device, dtype=options.dtype)  # [P, 2]
            outputs = self.model(
                image_embeddings=embeddings,
                input_points=points[None, :, None, :],  # [1, P, 1, 2]
                input_labels=torch.ones(1, len(points), 1, dtype=torch.long, device=options.device),
                multimask_output=True,
            )
            low_res = outputs.pred_masks[0].flatten(0, 1).float()[:, None]  # [P * K, 1, l, l] over the padded input
            padded = F.interpolate(low_res, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            unpadded = padded[:, :, :resized_h, :resized_w]
            logits = F.interpolate(unpadded, size=(height, width), mode="bilinear", align_corners=False)
            logits = logits[:, 0]  # [P * K, H, W]
            inner = (logits > options.sam_stability_offset).flatten(1).sum(1)
            outer = (logits > -options.sam_stability_offset).flatten(1).sum(1)
            stability = inner.float() / outer.clamp(min=1).float()
            iou = outputs.iou_scores[0].flatten().float()  # [P * K]
            binary = logits > 0  # [P * K, H, W]
            keep = iou > options.sam_pred_iou_threshold
            keep &= (stability > options.sam_stability_threshold) & binary.flatten(1).any(1)
            masks.append(binary[keep].cpu().numpy())
            scores.append(iou[keep].cpu().numpy())
        all_masks = np.concatenate(masks) if masks else np.zeros((0, height, width), dtype=bool)
        all_scores = np.concatenate(scores) if scores else np.zeros((0,), dtype=np.float32)
        return all_masks, all_scores

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[np.ndarray]) -> list[Labels]:
        """``sam_seg`` int32 [H, W] (0 = no mask) and ``sam_edge`` bool [H, W] per rgb image."""
        results = []
        for image in inputs:
            masks, scores = self._masks(image)
            if len(masks):
                instances = paint_instances(masks[box_nms(mask_boxes(masks), scores, self.options.sam_nms_threshold)])
            else:
                instances = np.zeros(image.shape[:2], dtype=np.int32)
            results.append(Labels(values={"sam_seg": instances, "sam_edge": instance_boundaries(instances)}))
        return results

    def provenance(self) -> dict[str, Any]:
        """The mask-generation settings."""
        o = self.options
        return {
            "labeler": type(self).__name__,
            "points_per_side": o.sam_points_per_side,
            "pred_iou_threshold": o.sam_pred_iou_threshold,
            "stability_threshold": o.sam_stability_threshold,
            "stability_offset": o.sam_stability_offset,
            "nms_threshold": o.sam_nms_threshold,
        }


# ----------------------------------------------------------------------------- construction

# CLI name -> what it writes; the order is the order labelers run in (depth before normal).
LABELER_MODALITIES: dict[str, tuple[str, ...]] = {
    "depth": DepthLabeler.modalities,
    "normal": NormalFromDepth.modalities,
    "seg": SegmentationLabeler.modalities,
    "sam": SamLabeler.modalities,
    "detection": DetectionLabeler.modalities,
    "dinov2": Dinov2Labeler.modalities,
    "clip": ClipLabeler.modalities,
    "caption": CaptionLabeler.modalities,
}
LABELER_NAMES: tuple[str, ...] = tuple(LABELER_MODALITIES)
WEIGHTLESS_LABELERS: tuple[str, ...] = ("normal",)  # derived, no model to load
DERIVED_FROM: dict[str, str] = {"normal": "depth"}  # labeler -> the labeler whose output it reads
_LABELER_CLASSES: dict[str, type[Labeler]] = {  # the labelers built from a weights directory
    "depth": DepthLabeler,
    "seg": SegmentationLabeler,
    "sam": SamLabeler,
    "detection": DetectionLabeler,
    "dinov2": Dinov2Labeler,
    "clip": ClipLabeler,
    "caption": CaptionLabeler,
}


def build_labeler(name: str, weights: Path | None, options: LabelerOptions) -> Labeler:
    """Construct the labeler called ``name`` (see ``LABELER_NAMES``) from its weights directory."""
    if name not in LABELER_MODALITIES:
        raise ValueError(f"unknown labeler {name!r}; choose from {', '.join(LABELER_NAMES)}")
    if name in WEIGHTLESS_LABELERS:
        return NormalFromDepth(options)
    if weights is None:
        raise ValueError(f"the {name} labeler needs a weights directory")
    return _LABELER_CLASSES[name](weights, options)
