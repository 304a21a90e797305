"""The MODUS shard format: reading, decoding, validating and writing webdataset samples.

One sample is one key with one file per modality, ``{key}.{file_key}.{format}`` (for example
``000000042.rgb.jpg``, ``000000042.det.json``); any subset of the 15 modalities may be
present. ``docs/DATA.md`` is the specification; this module is its only implementation.

Bad input never crashes a reader and never yields a silently wrong array: a sample with a
truncated member, an undecodable file, modalities of mismatched size, non-finite features,
a malformed annotation or no usable modality is skipped, counted by reason in a
``SkipCounter`` and logged at debug level; a shard that yields nothing is named in the log.

The module is loader-agnostic: ``iter_shard`` reads one shard from a sample offset (for exact
resume), and ``prepare_sample`` turns a decoded ``RawSample`` into model-ready 2D images and
raw 1D payloads. Splitting shards across ranks and workers is the loader's job.

Shapes: H, W image height and width in pixels; N boxes; D feature width; gh, gw the local
feature grid.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
from PIL import Image

from modus_mega.data import render
from modus_mega.modalities import MODALITIES, MODALITY_NAMES, modality

logger = logging.getLogger(__name__)

FORMAT_NAME = "modus-webdataset"
FORMAT_VERSION = 1
INDEX_FILENAME = "index.json"

# The one place where modality names meet file keys: every modality is stored under its
# own name except `detection`, stored as `det` (the name 4M and most pseudo-labelers use).
FILE_KEYS: dict[str, str] = {name: ("det" if name == "detection" else name) for name in MODALITY_NAMES}
MODALITY_OF_FILE_KEY: dict[str, str] = {key: name for name, key in FILE_KEYS.items()}
DEPTH_VALID_KEY = "depth_valid"  # optional per-pixel validity mask of `depth`

# Accepted formats (file extensions) per modality; the first is what `encode_modality` writes.
FORMATS: dict[str, tuple[str, ...]] = {
    "rgb": ("jpg", "jpeg", "png", "webp"),
    "depth": ("png", "npy"),
    "normal": ("png", "npy"),
    "seg": ("png", "npy"),
    "sam_seg": ("png", "npy"),
    "canny": ("png",),
    "sam_edge": ("png",),
    "caption": ("json", "txt"),
    "detection": ("json",),
    "grounding": ("json",),
    "dinov2_global": ("npy",),
    "dinov2_local": ("npy",),
    "clip_global": ("npy",),
    "imagebind_global": ("npy",),
    "imagebind_local": ("npy",),
}
DEPTH_VALID_FORMATS = ("png", "npy")
DEPTH_PNG_SCALE = 1000.0  # 16-bit depth PNGs hold millimetres: metres = value / 1000
IMAGE_MODALITIES: tuple[str, ...] = tuple(m.name for m in MODALITIES if m.family == "2d")
_BOX_TOLERANCE_PX = 1.0  # boxes may overshoot the image by this much (rounding); clipped


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index`` of a dataset: ``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


# ----------------------------------------------------------------------------- skip counting


class SkipReason(str, enum.Enum):
    """Why a sample was skipped. Values are the names that appear in logs."""

    TRUNCATED_TAR = "truncated_tar"  # the shard ends (or breaks) inside or before this sample
    UNDECODABLE = "undecodable"  # an image, array or text file that cannot be decoded
    BAD_SHAPE = "bad_shape"  # wrong rank or channel count for its modality
    BAD_VALUE = "bad_value"  # decodable but out of range (negative depth, 8-bit depth PNG, ...)
    SIZE_MISMATCH = "size_mismatch"  # 2D modalities (or box annotations) disagree on H x W
    NONFINITE = "nonfinite"  # NaN or inf in a feature, normal or box
    BAD_ANNOTATION = "bad_annotation"  # malformed caption / det / grounding JSON
    DUPLICATE_FILE = "duplicate_file"  # two files for one modality in one sample
    NO_USABLE_MODALITY = "no_usable_modality"  # nothing MODUS can read in the sample
    NO_USABLE_TARGET = "no_usable_target"  # used by the document builder: no allowed target present


class SampleError(ValueError):
    """A sample that must be skipped, with the reason it is counted under."""

    def __init__(self, reason: SkipReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SkipCounter:
    """Counts of good samples, skipped samples by reason, ignored files and failed shards.

    One counter per reader (per worker); ``merge`` combines them for the log.
    """

    samples_ok: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # SkipReason value -> samples
    ignored_files: Counter[str] = field(default_factory=Counter)  # unknown file key -> files
    failed_shards: list[str] = field(default_factory=list)  # shards that yielded no sample

    def skip(self, reason: SkipReason, detail: str) -> None:
        """Count one skipped sample under ``reason``; ``detail`` names the sample and the fault."""
        self.skipped[reason.value] += 1
        logger.debug("skipped sample (%s): %s", reason.value, detail)

    @property
    def num_skipped(self) -> int:
        """Total skipped samples over all reasons."""
        return sum(self.skipped.values())

    def merge(self, other: SkipCounter) -> None:
        """Add ``other``'s counts into this counter (e.g. from another worker)."""
        self.samples_ok += other.samples_ok
        self.skipped.update(other.skipped)
        self.ignored_files.update(other.ignored_files)
        self.failed_shards.extend(s for s in other.failed_shards if s not in self.failed_shards)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot for logs and checkpoints."""
        return {
            "samples_ok": self.samples_ok,
            "skipped": dict(sorted(self.skipped.items())),
            "ignored_files": dict(sorted(self.ignored_files.items())),
            "failed_shards": list(self.failed_shards),
        }

    def summary(self) -> str:
        """One log line: good samples, skips by reason, failed shards."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        text = f"{self.samples_ok} samples ok, {self.num_skipped} skipped ({reasons})"
        if self.failed_shards:
            text += f"; failed shards: {', '.join(self.failed_shards)}"
        return text


# ----------------------------------------------------------------------------- decoded types


@dataclass
class Detections:
    """Boxes of one image in pixel coordinates; pixel (i, j) covers [j, j+1) x [i, i+1)."""

    boxes: np.ndarray  # [N, 4] float32, x0 y0 x1 y1 in pixels, x0 <= x1, y0 <= y1
    classes: list[str]  # [N] class names
    scores: np.ndarray  # [N] float32 confidence (1.0 for ground truth)
    width: int  # image width the boxes refer to
    height: int  # image height the boxes refer to


@dataclass
class Groundings:
    """Referring expressions of one image, each with the pixel box it refers to."""

    boxes: np.ndarray  # [N, 4] float32, x0 y0 x1 y1 in pixels
    expressions: list[str]  # [N] referring expressions
    width: int  # image width the boxes refer to
    height: int  # image height the boxes refer to


Payload = Union[np.ndarray, list[str], Detections, Groundings]


@dataclass
class RawSample:
    """One decoded, validated sample; only the modalities present in the shard.

    Value types by modality (H x W identical across all 2D modalities of a sample):
    rgb uint8 [H, W, 3]; depth float32 [H, W] metres (0 where invalid); normal float32
    [H, W, 3] unit vectors in the camera frame x right, y up, z towards the camera (0 where
    invalid); seg, sam_seg int32 [H, W] class / instance ids; canny, sam_edge bool [H, W];
    caption list[str] (>= 1 non-empty); detection ``Detections``; grounding ``Groundings``
    (>= 1 entry); *_global float32 [D]; *_local float32 [gh, gw, D].
    """

    key: str  # the webdataset key
    shard: str  # the shard it was read from ("" when decoded outside a shard)
    index: int  # position of the sample in its shard, skipped samples included (for resume)
    modalities: dict[str, Payload]  # modality name -> decoded value
    valid: dict[str, np.ndarray]  # 2D modality -> bool [H, W] validity mask (depth, normal)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) shared by the sample's 2D modalities, or None if it has none."""
        for name in IMAGE_MODALITIES:
            if name in self.modalities:
                value = self.modalities[name]
                assert isinstance(value, np.ndarray)
                return int(value.shape[0]), int(value.shape[1])
        return None


@dataclass
class PreparedSample:
    """A sample ready for the document builder: 2D modalities rendered, 1D payloads raw."""

    key: str
    images: dict[str, np.ndarray]  # 2D modality -> float32 [3, H, W] in [-1, 1] (render.py)
    payloads: dict[str, Payload]  # 1D modality -> caption list / Detections / Groundings / features


def prepare_sample(sample: RawSample) -> PreparedSample:
    """Render every 2D modality to a 3-channel image in [-1, 1]; pass 1D payloads through."""
    images: dict[str, np.ndarray] = {}
    payloads: dict[str, Payload] = {}
    for name, value in sample.modalities.items():
        if name in IMAGE_MODALITIES:
            assert isinstance(value, np.ndarray)
            images[name] = render.modality_to_image(name, value, sample.valid.get(name))
        else:
            payloads[name] = value
    return PreparedSample(key=sample.key, images=images, payloads=payloads)


# ----------------------------------------------------------------------------- decoding


def _decode_pil(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode image ({err})") from None
    return image


def _decode_npy(data: bytes, what: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode .npy ({err})") from None
    if not isinstance(array, np.ndarray):
        raise SampleError(SkipReason.UNDECODABLE, f"{what}: .npy holds no array")
    return array


def _decode_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: invalid JSON ({err})") from None


def _single_channel(image: Image.Image, what: str) -> np.ndarray:
    """Integer ids / values of a single-channel image (palette images give their indices)."""
    if image.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raise SampleError(
            SkipReason.BAD_SHAPE, f"{what}: expected a single-channel PNG, got mode {image.mode!r}"
        )
    return np.asarray(image).astype(np.int64)


def _require_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise SampleError(SkipReason.NONFINITE, f"{what}: {bad} non-finite values")


def _decode_rgb(data: bytes, fmt: str, what: str) -> np.ndarray:
    image = _decode_pil(data, what)
    if image.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "LA", "YCbCr"):
        raise SampleError(SkipReason.BAD_SHAPE, f"{what}: unsupported image mode {image.mode!r}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]


def _decode_depth(data: bytes, fmt: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Depth in metres [H, W] and its validity [H, W]; invalid pixels are 0."""
    if fmt == "png":
        image = _decode_pil(data, what)
        if image.mode in ("L", "P", "1"):
            raise SampleError(
                SkipReason.BAD_VALUE, f"{what}: depth PNGs must be 16-bit millimetres, got 8-bit"
            )
        millimetres = _single_channel(image, what)
        if millimetres.min(initial=0) < 0:
            raise SampleError(SkipReason.BAD_VALUE, f"{what}: negative depth")
        depth = (millimetres / DEPTH_PNG_SCALE).astype(np.float32)
    else:
        depth = _decode_npy(data, what)
        if depth.ndim == 3 and depth.shape[-1] == 1:
            depth = depth[..., 0]
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: depth must be [H, W], got {depth.shape}")
        depth = depth.astype(np.float32)
        if (depth < 0).any():
            raise SampleError(SkipReason.BAD_VALUE, f"{what}: negative depth")
        depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)  # NaN / inf: invalid
    valid = depth > 0
    return depth, valid


def _decode_mask(data: bytes, fmt: str, what: str) -> np.ndarray:
    if fmt == "png":
        return _single_channel(_decode_pil(data, what), what) != 0
    mask = _decode_npy(data, what)
    if mask.ndim != 2:
        raise SampleError(SkipReason.BAD_SHAPE, f"{what}: mask must be [H, W], got {mask.shape}")
    return mask.astype(bool)


def _decode_normal(data: bytes, fmt: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit normals [H, W, 3] and their validity; a vector shorter than 0.5 is invalid."""
    if fmt == "png":
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # keeps 16-bit
        if raw is None:
            raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode PNG")
        if raw.ndim != 3 or raw.shape[2] not in (3, 4):
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: normal PNG must be RGB, got {raw.shape}")
        full_scale = 65535.0 if raw.dtype == np.uint16 else 255.0
        normal = raw[..., 2::-1].astype(np.float32) / full_scale * 2.0 - 1.0  # BGR -> RGB = xyz
    else:
        normal = _decode_npy(data, what)
        if normal.ndim != 3 or normal.shape[2] != 3:
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: normals must be [H, W, 3], got {normal.shape}")
        normal = normal.astype(np.float32)
        _require_finite(normal, what)
    norm = np.linalg.norm(normal, axis=-1)
    valid = norm > 0.5
    normal = np.where(valid[..., None], normal / np.maximum(norm, 1e-6)[..., None], 0.0).astype(np.float32)
    return normal, valid


def _decode_labels(data: bytes, fmt: str, what: str) -> np.ndarray:
    if fmt == "png":
        labels = _single_channel(_decode_pil(data, what), what)
    else:
        labels = _decode_npy(data, what)
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
            raise SampleError(
                SkipReason.BAD_SHAPE, f"{what}: labels must be integer [H, W], got {labels.dtype} {labels.shape}"
            )
    if labels.min(initial=0) < 0 or labels.max(initial=0) > np.iinfo(np.int32).max:
        raise SampleError(SkipReason.BAD_VALUE, f"{what}: label ids must lie in [0, 2^31)")
    return labels.astype(np.int32)


def _decode_edges(data: bytes, fmt: str, what: str) -> np.ndarray:
    return _single_channel(_decode_pil(data, what), what) != 0


def _decode_caption(data: bytes, fmt: str, what: str) -> list[str]:
    if fmt == "txt":
        try:
            texts: Any = [data.decode("utf-8")]
        except UnicodeDecodeError as err:
            raise SampleError(SkipReason.UNDECODABLE, f"{what}: not UTF-8 ({err})") from None
    else:
        texts = _decode_json(data, what)
        texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: expected a string or a list of strings")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: no non-empty caption")
    return texts


def _box_array(raw: Any, what: str) -> np.ndarray:
    try:
        boxes = np.asarray(raw, dtype=np.float64).reshape(-1, 4)
    except (TypeError, ValueError):
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: boxes must be lists of 4 numbers") from None
    _require_finite(boxes, what)
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: boxes must satisfy x0 <= x1 and y0 <= y1")
    return boxes.astype(np.float32)


def _annotation_size(raw: Mapping[str, Any], what: str) -> tuple[int, int] | None:
    """(H, W) declared by a det / grounding JSON, if any."""
    if "width" not in raw and "height" not in raw:
        return None
    width, height = raw.get("width"), raw.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: width and height must be positive integers")
    return height, width


def _decode_detection(data: bytes, fmt: str, what: str) -> tuple[dict[str, Any], tuple[int, int] | None]:
    raw = _decode_json(data, what)
    if not isinstance(raw, dict) or not isinstance(raw.get("objects"), list):
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: expected {{'objects': [...], ...}}")
    objects = raw["objects"]
    if not all(isinstance(o, dict) and isinstance(o.get("class"), str) and "box" in o for o in objects):
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: every object needs 'box' and a string 'class'")
    scores = np.asarray([o.get("score", 1.0) for o in objects], dtype=np.float64)
    _require_finite(scores, what)
    fields = {
        "boxes": _box_array([o["box"] for o in objects], what),
        "classes": [o["class"].strip() for o in objects],
        "scores": scores.astype(np.float32),
    }
    return fields, _annotation_size(raw, what)


def _decode_grounding(data: bytes, fmt: str, what: str) -> tuple[dict[str, Any], tuple[int, int] | None]:
    raw = _decode_json(data, what)
    if isinstance(raw, dict) and "expression" in raw:  # single-phrase form
        phrases = [{"expression": raw["expression"], "box": raw.get("box")}]
    elif isinstance(raw, dict) and isinstance(raw.get("phrases"), list):
        phrases = raw["phrases"]
    else:
        raise SampleError(
            SkipReason.BAD_ANNOTATION, f"{what}: expected {{'phrases': [...]}} or {{'expression', 'box'}}"
        )
    if not phrases or not all(
        isinstance(p, dict) and isinstance(p.get("expression"), str) and p["expression"].strip() and "box" in p
        for p in phrases
    ):
        raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: every phrase needs a non-empty 'expression' and a 'box'")
    fields = {
        "boxes": _box_array([p["box"] for p in phrases], what),
        "expressions": [p["expression"].strip() for p in phrases],
    }
    return fields, _annotation_size(raw, what)


def _decode_feature(data: bytes, fmt: str, what: str, kind: str) -> np.ndarray:
    feature = _decode_npy(data, what)
    if not np.issubdtype(feature.dtype, np.floating):
        raise SampleError(SkipReason.BAD_VALUE, f"{what}: features must be floating point, got {feature.dtype}")
    if kind == "feature_global":
        if feature.ndim == 2 and feature.shape[0] == 1:
            feature = feature[0]
        if feature.ndim != 1 or feature.shape[0] == 0:
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: global features must be [D], got {feature.shape}")
    else:
        if feature.ndim == 2:  # [gh * gw, D] patch tokens of a square grid
            side = math.isqrt(feature.shape[0])
            if side * side != feature.shape[0]:
                raise SampleError(
                    SkipReason.BAD_SHAPE, f"{what}: {feature.shape[0]} patches do not form a square grid; store [gh, gw, D]"
                )
            feature = feature.reshape(side, side, feature.shape[1])
        if feature.ndim != 3 or 0 in feature.shape:
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: local features must be [gh, gw, D], got {feature.shape}")
    feature = feature.astype(np.float32)
    _require_finite(feature, what)
    return feature


def _split_name(file_name: str) -> tuple[str, str]:
    """``'rgb.jpg'`` -> ``('rgb', 'jpg')``; the file key is everything before the last dot."""
    stem, _, fmt = file_name.rpartition(".")
    return stem, fmt.lower()


def decode_sample(
    key: str, files: Iterable[tuple[str, bytes]], counter: SkipCounter, shard: str = "", index: int = 0
) -> RawSample:
    """Decode and validate one sample's files, ``[('rgb.jpg', b'...'), ...]`` (or ``dict.items()``).

    Unknown file keys are ignored and counted in ``counter.ignored_files``. Raises
    ``SampleError`` (with its ``SkipReason``) if any file is bad, if the 2D modalities or the
    box annotations disagree on the image size, or if no modality is usable.
    """
    modalities: dict[str, Payload] = {}
    valid: dict[str, np.ndarray] = {}
    annotations: dict[str, tuple[dict[str, Any], tuple[int, int] | None]] = {}
    depth_valid: np.ndarray | None = None
    seen: dict[str, str] = {}
    files = sorted(files)
    for file_name, data in files:
        file_key, fmt = _split_name(file_name)
        what = f"{shard or '<memory>'}:{key}.{file_name}"
        name = MODALITY_OF_FILE_KEY.get(file_key)
        accepted = DEPTH_VALID_FORMATS if file_key == DEPTH_VALID_KEY else FORMATS.get(name or "", ())
        if fmt not in accepted:
            counter.ignored_files[file_name] += 1
            continue
        if file_key in seen:
            raise SampleError(SkipReason.DUPLICATE_FILE, f"{what}: {file_key} also stored as {seen[file_key]}")
        seen[file_key] = file_name
        if file_key == DEPTH_VALID_KEY:
            depth_valid = _decode_mask(data, fmt, what)
        elif name == "rgb":
            modalities[name] = _decode_rgb(data, fmt, what)
        elif name == "depth":
            modalities[name], valid[name] = _decode_depth(data, fmt, what)
        elif name == "normal":
            modalities[name], valid[name] = _decode_normal(data, fmt, what)
        elif name in ("seg", "sam_seg"):
            modalities[name] = _decode_labels(data, fmt, what)
        elif name in ("canny", "sam_edge"):
            modalities[name] = _decode_edges(data, fmt, what)
        elif name == "caption":
            modalities[name] = _decode_caption(data, fmt, what)
        elif name == "detection":
            annotations[name] = _decode_detection(data, fmt, what)
        elif name == "grounding":
            annotations[name] = _decode_grounding(data, fmt, what)
        else:
            assert name is not None
            modalities[name] = _decode_feature(data, fmt, what, modality(name).kind)

    where = f"{shard or '<memory>'}:{key}"
    sizes = {n: tuple(v.shape[:2]) for n, v in modalities.items() if n in IMAGE_MODALITIES}  # type: ignore[union-attr]
    if depth_valid is not None:
        if "depth" not in modalities:
            raise SampleError(SkipReason.BAD_ANNOTATION, f"{where}: {DEPTH_VALID_KEY} without depth")
        sizes[DEPTH_VALID_KEY] = depth_valid.shape
        valid["depth"] = valid["depth"] & depth_valid
        modalities["depth"] = np.where(valid["depth"], modalities["depth"], 0.0).astype(np.float32)  # type: ignore[arg-type]
    for name, (_, declared) in annotations.items():
        if declared is not None:
            sizes[name] = declared
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}={s[0]}x{s[1]}" for n, s in sizes.items())
        raise SampleError(SkipReason.SIZE_MISMATCH, f"{where}: modalities disagree on H x W ({listing})")
    image_size = next(iter(sizes.values()), None)
    for name, (fields, declared) in annotations.items():
        if image_size is None:
            raise SampleError(
                SkipReason.BAD_ANNOTATION,
                f"{where}: {FILE_KEYS[name]}.json has no width/height and the sample has no 2D modality to take it from",
            )
        height, width = image_size
        boxes = fields["boxes"]
        limit = np.array([width, height, width, height], dtype=np.float32)
        if (boxes < -_BOX_TOLERANCE_PX).any() or (boxes > limit + _BOX_TOLERANCE_PX).any():
            raise SampleError(SkipReason.BAD_ANNOTATION, f"{where}: a {name} box lies outside the {width}x{height} image")
        fields["boxes"] = np.clip(boxes, 0.0, limit).astype(np.float32)
        if name == "detection":
            modalities[name] = Detections(width=width, height=height, **fields)
        else:
            modalities[name] = Groundings(width=width, height=height, **fields)
    if not modalities:
        names = ", ".join(name for name, _ in files) or "no files"
        raise SampleError(SkipReason.NO_USABLE_MODALITY, f"{where}: no usable modality ({names})")
    ordered = {name: modalities[name] for name in MODALITY_NAMES if name in modalities}
    return RawSample(key=key, shard=shard, index=index, modalities=ordered, valid=valid)


# ----------------------------------------------------------------------------- reading shards


def _group_members(tar: tarfile.TarFile) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Consecutive members sharing a key form one sample (the webdataset convention).

    A group is yielded when the next key starts, or when the archive ends; a tar that breaks
    inside a member raises ``tarfile.ReadError`` and that partial group is never yielded.
    """
    key: str | None = None
    files: list[tuple[str, bytes]] = []
    for member in tar:
        if not member.isfile():
            continue
        directory, _, base = member.name.rpartition("/")
        stem, dot, suffix = base.partition(".")
        if not dot:
            continue  # a file without a modality suffix carries nothing MODUS reads
        member_key = f"{directory}/{stem}" if directory else stem
        if member_key != key and key is not None:
            yield key, files
            files = []
        key = member_key
        extracted = tar.extractfile(member)
        assert extracted is not None
        files.append((suffix, extracted.read()))
    if key is not None:
        yield key, files


def iter_shard(
    path: str | os.PathLike[str],
    counter: SkipCounter,
    start: int = 0,
    expected_samples: int | None = None,
) -> Iterator[RawSample]:
    """Yield the valid samples of one ``.tar`` shard, from sample position ``start`` on.

    Every sample position counts, skipped samples included, so a loader resumes exactly by
    passing ``start = last_yielded.index + 1``. Skipped samples go to ``counter``. A shard that
    is missing, breaks inside a member, or ends without the tar end-of-archive marker loses
    the samples from the break on, counted as ``truncated_tar`` (the last sample before a
    missing marker is held back until the marker is checked, since it may lack files). With
    ``expected_samples`` (from the index) every promised sample that is absent is counted. A
    shard that yields nothing is named in the log and in ``counter.failed_shards``.
    """
    shard = os.fspath(path)
    position = 0  # index of the next sample group
    yielded = 0
    complete = False
    pending: tuple[str, list[tuple[str, bytes]]] | None = None
    try:
        with open(shard, "rb") as handle:
            with tarfile.open(fileobj=handle, mode="r|") as tar:
                for group in _group_members(tar):
                    if pending is not None:
                        sample = _decode_or_count(pending, counter, shard, position, start)
                        position += 1
                        if sample is not None:
                            yielded += 1
                            yield sample
                    pending = group
                end_offset = tar.offset
            handle.seek(end_offset)
            tail = handle.read(2 * tarfile.BLOCKSIZE)
        # A complete tar ends with two zero blocks; tarfile stops silently without them.
        complete = len(tail) == 2 * tarfile.BLOCKSIZE and not any(tail)
        if not complete:
            logger.warning("shard %s lacks the tar end-of-archive marker: truncated", shard)
    except (tarfile.TarError, OSError, EOFError) as err:
        # The group in flight is partial and never came out; `pending` is complete.
        logger.warning("shard %s breaks after %d samples: %s", shard, position + (pending is not None), err)
        if pending is not None:
            sample = _decode_or_count(pending, counter, shard, position, start)
            position += 1
            if sample is not None:
                yielded += 1
                yield sample
            pending = None
    if complete and pending is not None:
        sample = _decode_or_count(pending, counter, shard, position, start)
        position += 1
        if sample is not None:
            yielded += 1
            yield sample
    lost_until = max(expected_samples or 0, position + (0 if complete else 1))
    for index in range(max(position, start), lost_until):
        counter.skip(SkipReason.TRUNCATED_TAR, f"{shard}: sample {index} missing (shard holds {position})")
    if yielded == 0 and start == 0:
        if shard not in counter.failed_shards:
            counter.failed_shards.append(shard)
        logger.warning("shard %s yielded no usable sample (%s)", shard, counter.summary())


def _decode_or_count(
    group: tuple[str, list[tuple[str, bytes]]], counter: SkipCounter, shard: str, index: int, start: int
) -> RawSample | None:
    """Decode one sample group at shard position ``index``; None if before ``start`` or skipped."""
    if index < start:
        return None
    key, files = group
    try:
        sample = decode_sample(key, files, counter, shard=shard, index=index)
    except SampleError as err:
        counter.skip(err.reason, str(err))
        return None
    counter.samples_ok += 1
    return sample


def read_sample_files(tar_path: str | os.PathLike[str]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """The raw ``(key, [(file name, bytes)])`` groups of a shard, undecoded (tools and tests)."""
    with tarfile.open(os.fspath(tar_path), mode="r|") as tar:
        yield from _group_members(tar)


# ----------------------------------------------------------------------------- index


@dataclass(frozen=True)
class ShardInfo:
    """One shard listed in a dataset index."""

    path: Path  # absolute path of the .tar file
    num_samples: int  # samples stored in it (before any skipping)


def read_index(directory: str | os.PathLike[str]) -> list[ShardInfo]:
    """The shards of a dataset directory, from its ``index.json``."""
    root = Path(directory)
    index_path = root / INDEX_FILENAME
    if not index_path.is_file():
        raise ValueError(
            f"{index_path} not found; write it with modus_mega.data.shards.write_index({str(root)!r}) "
            "or generate data with `python -m modus_mega.data.synth --out DIR`"
        )
    raw = json.loads(index_path.read_text())
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{index_path}: format {raw.get('format')!r} v{raw.get('version')} is not {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return [ShardInfo(path=(root / s["name"]).resolve(), num_samples=int(s["num_samples"])) for s in raw["shards"]]


def write_index(
    directory: str | os.PathLike[str],
    shards: Iterable[tuple[str, int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``index.json`` listing ``(shard file name, num_samples)``; scans ``*.tar`` if None."""
    root = Path(directory)
    if shards is None:
        shards = [(p.name, sum(1 for _ in read_sample_files(p))) for p in sorted(root.glob("*.tar"))]
    listing = [{"name": name, "num_samples": int(n)} for name, n in shards]
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_samples": sum(s["num_samples"] for s in listing),
        "shards": listing,
        **(dict(extra) if extra else {}),
    }
    path = root / INDEX_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- encoding / writing


def _png(array: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok, "OpenCV failed to encode a PNG"
    return buffer.tobytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _labels_png(labels: np.ndarray, what: str) -> bytes:
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError(f"{what}: ids must lie in [0, 65535] for PNG storage; store them as .npy instead")
    return _png(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16))


def encode_modality(
    name: str,
    value: Payload,
    *,
    image_format: str = "png",
    feature_dtype: np.dtype | type = np.float32,
    jpeg_quality: int = 95,
) -> dict[str, bytes]:
    """Encode one decoded modality value into its shard files (``{'rgb.jpg': bytes}``).

    The inverse of the decoders above, using the first accepted format of each modality,
    except rgb (``image_format``: png or jpg). Depth is written as 16-bit millimetres with 0 =
    invalid, so pass depth that is 0 where invalid.
    """
    key = FILE_KEYS[modality(name).name]
    if name == "rgb":
        assert isinstance(value, np.ndarray)
        bgr = np.ascontiguousarray(value[..., ::-1])
        if image_format == "png":
            return {f"{key}.png": _png(bgr)}
        if image_format != "jpg":
            raise ValueError(f"rgb image_format must be 'png' or 'jpg', got {image_format!r}")
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        assert ok, "OpenCV failed to encode a JPEG"
        return {f"{key}.jpg": buffer.tobytes()}
    if name == "depth":
        assert isinstance(value, np.ndarray)
        millimetres = np.round(value.astype(np.float64) * DEPTH_PNG_SCALE)
        millimetres = np.where((millimetres > 0) & (millimetres <= 65535), millimetres, 0)  # out of range: invalid
        return {f"{key}.png": _png(millimetres.astype(np.uint16))}
    if name == "normal":
        assert isinstance(value, np.ndarray)
        encoded = np.clip(np.round((value.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return {f"{key}.png": _png(np.ascontiguousarray(encoded[..., ::-1]))}
    if name in ("seg", "sam_seg"):
        assert isinstance(value, np.ndarray)
        return {f"{key}.png": _labels_png(value, name)}
    if name in ("canny", "sam_edge"):
        assert isinstance(value, np.ndarray)
        return {f"{key}.png": _png(np.where(value, 255, 0).astype(np.uint8))}
    if name == "caption":
        assert isinstance(value, list)
        return {f"{key}.json": json.dumps(value).encode("utf-8")}
    if name == "detection":
        assert isinstance(value, Detections)
        objects = [
            {"box": [float(c) for c in box], "class": cls, "score": float(score)}
            for box, cls, score in zip(value.boxes, value.classes, value.scores)
        ]
        payload = {"width": value.width, "height": value.height, "objects": objects}
        return {f"{key}.json": json.dumps(payload).encode("utf-8")}
    if name == "grounding":
        assert isinstance(value, Groundings)
        phrases = [{"expression": e, "box": [float(c) for c in b]} for e, b in zip(value.expressions, value.boxes)]
        payload = {"width": value.width, "height": value.height, "phrases": phrases}
        return {f"{key}.json": json.dumps(payload).encode("utf-8")}
    assert isinstance(value, np.ndarray)
    return {f"{key}.npy": _npy(value.astype(feature_dtype))}


def write_shard(path: str | os.PathLike[str], samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write ``(key, {file name: bytes})`` samples into a tar, atomically; returns the count.

    Members carry fixed metadata (mtime 0, uid 0, mode 0644) so equal inputs give equal bytes.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    count = 0
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            if "." in key.rpartition("/")[2]:
                raise ValueError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
            for file_name in sorted(files):
                data = files[file_name]
                info = tarfile.TarInfo(f"{key}.{file_name}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(tmp, target)
    return count
