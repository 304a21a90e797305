"""Bytes <-> values: one codec per kind of shard file, the ``codec`` column of the modality table.

A codec knows the file formats (extensions) it accepts, the first being the one it writes,
how to decode one file into the value type of its modality (``docs/DATA.md``) and how to
encode a value back. Decoding never yields a silently wrong array: a bad file raises
``SampleError`` with the reason it is counted under.

Box annotations (detection, grounding) refer to the image they annotate: their codecs decode
the boxes and the size the file declares (if any), and ``place`` checks and clips them once the
reader knows the sample's image size.

Shapes: H, W image height and width in pixels; N boxes; D feature width; gh, gw the local
feature grid.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
from PIL import Image

from modus_mega.modalities.faults import SampleError, SkipReason
from modus_mega.modalities.values import Detections, Groundings, Payload

DEPTH_PNG_SCALE = 1000.0  # 16-bit depth PNGs hold millimetres: metres = value / 1000
_BOX_TOLERANCE_PX = 1.0  # boxes may overshoot the image by this much (rounding); clipped


@dataclass(frozen=True)
class Decoded:
    """One decoded file: its value, the validity of its pixels, the image size it declares."""

    value: Payload
    valid: np.ndarray | None = None  # bool [H, W] for maps with invalid pixels (depth, normal)
    declared_size: tuple[int, int] | None = None  # (H, W) stated by a box annotation file


@dataclass(frozen=True)
class DecodeLimits:
    """Sizes a file may claim in its header; checked before anything is allocated (``data.max_*``)."""

    max_image_pixels: int = 1 << 26  # width x height of an image (the DataConfig default)
    max_array_bytes: int = 1 << 30  # bytes of a .npy array, and of any tar member (the DataConfig default)


@dataclass(frozen=True)
class EncodeOptions:
    """How a writer stores values: rgb container, feature precision, JPEG quality."""

    image_format: str = "png"  # rgb only: png or jpg
    feature_dtype: np.dtype | type = np.float32  # stored dtype of feature arrays
    jpeg_quality: int = 95
    float_maps_as_npy: bool = False  # depth as float32 .npy metres instead of 16-bit PNG millimetres


class Codec:
    """Base codec: decode one file, encode one value; box codecs also ``place`` their boxes."""

    formats: tuple[str, ...] = ()  # accepted extensions, lower case; the first is written
    needs_image_size = False  # True for box annotations: ``place`` runs once the size is known

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        """Decode the bytes of one file of format ``fmt`` within ``limits``; ``what`` names it in errors."""
        raise NotImplementedError

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        """``{extension: bytes}`` of one value (the inverse of ``decode``)."""
        raise NotImplementedError

    def place(self, value: Payload, height: int, width: int, where: str) -> Payload:
        """``value`` fitted to the sample's ``height`` x ``width`` image (boxes only)."""
        return value


# ----------------------------------------------------------------------------- helpers


def _open_pil(data: bytes, what: str, limits: DecodeLimits) -> Image.Image:
    """A lazily opened PIL image (header read, pixels not), refused if it claims too many pixels.

    ``limits`` governs, not PIL's own bomb threshold: its warning is silenced here and its error
    (twice its threshold) is ``too_large`` like ours.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise SampleError(SkipReason.TOO_LARGE, f"{what}: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode image ({err})") from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise SampleError(
            SkipReason.TOO_LARGE,
            f"{what}: {width}x{height} image exceeds data.max_image_pixels={limits.max_image_pixels}",
        )
    return image


def decode_pil(data: bytes, what: str, limits: DecodeLimits) -> Image.Image:
    """A fully decoded PIL image; too large (by its header) is ``too_large``, truncated or corrupt ``undecodable``."""
    image = _open_pil(data, what, limits)
    try:
        image.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode image ({err})") from None
    return image


def _npy_header(data: bytes, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a ``.npy`` header, without reading the array."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as err:
        raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode .npy ({err})") from None
    return shape, dtype


def decode_npy(data: bytes, what: str, limits: DecodeLimits) -> np.ndarray:
    """The array of one ``.npy`` file (never unpickles); the size its header claims is checked before loading."""
    shape, dtype = _npy_header(data, what)
    claimed = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if claimed > limits.max_array_bytes:
        raise SampleError(
            SkipReason.TOO_LARGE,
            f"{what}: .npy header claims {shape} {dtype} ({claimed} bytes) > data.max_array_bytes={limits.max_array_bytes}",
        )
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


def png_bytes(array: np.ndarray) -> bytes:
    """A PNG of a uint8 / uint16 array, [H, W] or [H, W, 3] in OpenCV's BGR order."""
    ok, buffer = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok, "OpenCV failed to encode a PNG"
    return buffer.tobytes()


def npy_bytes(array: np.ndarray) -> bytes:
    """A ``.npy`` file of ``array`` (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode("utf-8")


# ----------------------------------------------------------------------------- 2D maps


class RgbCodec(Codec):
    """rgb: uint8 [H, W, 3]; any PIL colour mode is converted to RGB."""

    formats = ("jpg", "jpeg", "png", "webp")

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        image = decode_pil(data, what, limits)
        if image.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "LA", "YCbCr"):
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: unsupported image mode {image.mode!r}")
        return Decoded(np.asarray(image.convert("RGB"), dtype=np.uint8))  # [H, W, 3]

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, np.ndarray)
        bgr = np.ascontiguousarray(value[..., ::-1])
        if options.image_format == "png":
            return {"png": png_bytes(bgr)}
        if options.image_format != "jpg":
            raise ValueError(f"rgb image_format must be 'png' or 'jpg', got {options.image_format!r}")
        ok, buffer = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality])
        assert ok, "OpenCV failed to encode a JPEG"
        return {"jpg": buffer.tobytes()}


class DepthCodec(Codec):
    """depth: float32 [H, W] metres in [0, inf), 0 where invalid; PNGs hold 16-bit millimetres."""

    formats = ("png", "npy")

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        if fmt == "png":
            image = decode_pil(data, what, limits)
            if image.mode in ("L", "P", "1"):
                raise SampleError(
                    SkipReason.BAD_VALUE, f"{what}: depth PNGs must be 16-bit millimetres, got 8-bit"
                )
            millimetres = _single_channel(image, what)
            if millimetres.min(initial=0) < 0:
                raise SampleError(SkipReason.BAD_VALUE, f"{what}: negative depth")
            depth = (millimetres / DEPTH_PNG_SCALE).astype(np.float32)
        else:
            depth = decode_npy(data, what, limits)
            if depth.ndim == 3 and depth.shape[-1] == 1:
                depth = depth[..., 0]
            if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
                raise SampleError(SkipReason.BAD_SHAPE, f"{what}: depth must be [H, W], got {depth.shape}")
            depth = depth.astype(np.float32)
            if (depth < 0).any():
                raise SampleError(SkipReason.BAD_VALUE, f"{what}: negative depth")
            depth = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)  # NaN / inf: invalid
        return Decoded(depth, valid=depth > 0)

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        """16-bit millimetres (or float32 .npy metres) with 0 = invalid, so pass depth that is 0 where invalid."""
        assert isinstance(value, np.ndarray)
        if options.float_maps_as_npy:
            return {"npy": npy_bytes(value.astype(np.float32))}
        millimetres = np.round(value.astype(np.float64) * DEPTH_PNG_SCALE)
        millimetres = np.where((millimetres > 0) & (millimetres <= 65535), millimetres, 0)  # out of range: invalid
        return {"png": png_bytes(millimetres.astype(np.uint16))}


class MaskCodec(Codec):
    """A validity mask (``depth_valid``): bool [H, W], nonzero = valid."""

    formats = ("png", "npy")

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        if fmt == "png":
            return Decoded(_single_channel(decode_pil(data, what, limits), what) != 0)
        mask = decode_npy(data, what, limits)
        if mask.ndim != 2:
            raise SampleError(SkipReason.BAD_SHAPE, f"{what}: mask must be [H, W], got {mask.shape}")
        return Decoded(mask.astype(bool))

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, np.ndarray)
        return {"png": png_bytes(np.where(value, 255, 0).astype(np.uint8))}


class NormalCodec(Codec):
    """normal: float32 [H, W, 3] unit vectors in [-1, 1] (camera frame x right, y up, z out), 0 where invalid."""

    formats = ("png", "npy")

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        """A vector shorter than 0.5 is invalid; PNGs map [0, full scale] to [-1, 1]."""
        if fmt == "png":
            _open_pil(data, what, limits)  # the size check, before OpenCV allocates
            raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # keeps 16-bit
            if raw is None:
                raise SampleError(SkipReason.UNDECODABLE, f"{what}: cannot decode PNG")
            if raw.ndim != 3 or raw.shape[2] not in (3, 4):
                raise SampleError(SkipReason.BAD_SHAPE, f"{what}: normal PNG must be RGB, got {raw.shape}")
            full_scale = 65535.0 if raw.dtype == np.uint16 else 255.0
            normal = raw[..., 2::-1].astype(np.float32) / full_scale * 2.0 - 1.0  # BGR -> RGB = xyz
        else:
            normal = decode_npy(data, what, limits)
            if normal.ndim != 3 or normal.shape[2] != 3:
                raise SampleError(SkipReason.BAD_SHAPE, f"{what}: normals must be [H, W, 3], got {normal.shape}")
            normal = normal.astype(np.float32)
            _require_finite(normal, what)
        norm = np.linalg.norm(normal, axis=-1)
        valid = norm > 0.5
        normal = np.where(valid[..., None], normal / np.maximum(norm, 1e-6)[..., None], 0.0).astype(np.float32)
        return Decoded(normal, valid=valid)

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, np.ndarray)
        encoded = np.clip(np.round((value.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
        return {"png": png_bytes(np.ascontiguousarray(encoded[..., ::-1]))}


class LabelsCodec(Codec):
    """seg, sam_seg: int32 [H, W] class / instance ids in [0, 2^31); PNG storage holds ids < 2^16."""

    formats = ("png", "npy")
    value_range = (0, np.iinfo(np.int32).max)

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        if fmt == "png":
            labels = _single_channel(decode_pil(data, what, limits), what)
        else:
            labels = decode_npy(data, what, limits)
            if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
                raise SampleError(
                    SkipReason.BAD_SHAPE, f"{what}: labels must be integer [H, W], got {labels.dtype} {labels.shape}"
                )
        low, high = self.value_range
        if labels.min(initial=0) < low or labels.max(initial=0) > high:
            raise SampleError(SkipReason.BAD_VALUE, f"{what}: label ids must lie in [0, 2^31)")
        return Decoded(labels.astype(np.int32))

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, np.ndarray)
        if value.min(initial=0) < 0 or value.max(initial=0) > 65535:
            raise ValueError("label ids must lie in [0, 65535] for PNG storage; store them as .npy instead")
        return {"png": png_bytes(value.astype(np.uint8 if value.max(initial=0) < 256 else np.uint16))}


class EdgesCodec(Codec):
    """canny, sam_edge: bool [H, W], stored as a single-channel PNG (nonzero = edge)."""

    formats = ("png",)

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        return Decoded(_single_channel(decode_pil(data, what, limits), what) != 0)

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, np.ndarray)
        return {"png": png_bytes(np.where(value, 255, 0).astype(np.uint8))}


# ----------------------------------------------------------------------------- 1D modalities


class CaptionCodec(Codec):
    """caption: list[str], at least one non-empty; JSON (a string or a list) or plain UTF-8 text."""

    formats = ("json", "txt")

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
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
        return Decoded(texts)

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, list)
        return {"json": _json_bytes(value)}


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


class BoxCodec(Codec):
    """Shared ``place`` of the two box annotations: boxes inside the image (1 px tolerance), clipped."""

    formats = ("json",)
    needs_image_size = True

    def place(self, value: Payload, height: int, width: int, where: str) -> Payload:
        assert isinstance(value, (Detections, Groundings))
        limit = np.array([width, height, width, height], dtype=np.float32)
        boxes = value.boxes
        if (boxes < -_BOX_TOLERANCE_PX).any() or (boxes > limit + _BOX_TOLERANCE_PX).any():
            raise SampleError(SkipReason.BAD_ANNOTATION, f"{where}: a box lies outside the {width}x{height} image")
        return replace(value, boxes=np.clip(boxes, 0.0, limit).astype(np.float32), width=width, height=height)


class DetectionsCodec(BoxCodec):
    """detection: ``Detections`` from ``{"objects": [{"box", "class", "score"?}], "width"?, "height"?}``."""

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        raw = _decode_json(data, what)
        if not isinstance(raw, dict) or not isinstance(raw.get("objects"), list):
            raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: expected {{'objects': [...], ...}}")
        objects = raw["objects"]
        if not all(isinstance(o, dict) and isinstance(o.get("class"), str) and "box" in o for o in objects):
            raise SampleError(SkipReason.BAD_ANNOTATION, f"{what}: every object needs 'box' and a string 'class'")
        scores = np.asarray([o.get("score", 1.0) for o in objects], dtype=np.float64)
        _require_finite(scores, what)
        value = Detections(
            boxes=_box_array([o["box"] for o in objects], what),
            classes=[o["class"].strip() for o in objects],
            scores=scores.astype(np.float32),
            width=0,  # set by `place`
            height=0,
        )
        return Decoded(value, declared_size=_annotation_size(raw, what))

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, Detections)
        objects = [
            {"box": [float(c) for c in box], "class": cls, "score": float(score)}
            for box, cls, score in zip(value.boxes, value.classes, value.scores)
        ]
        return {"json": _json_bytes({"width": value.width, "height": value.height, "objects": objects})}


class GroundingsCodec(BoxCodec):
    """grounding: ``Groundings`` from ``{"phrases": [{"expression", "box"}]}`` or one ``{"expression", "box"}``."""

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
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
        value = Groundings(
            boxes=_box_array([p["box"] for p in phrases], what),
            expressions=[p["expression"].strip() for p in phrases],
            width=0,  # set by `place`
            height=0,
        )
        return Decoded(value, declared_size=_annotation_size(raw, what))

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, Groundings)
        phrases = [{"expression": e, "box": [float(c) for c in b]} for e, b in zip(value.expressions, value.boxes)]
        return {"json": _json_bytes({"width": value.width, "height": value.height, "phrases": phrases})}


@dataclass(frozen=True)
class FeatureCodec(Codec):
    """Features, finite float32: global [D] (``[1, D]`` accepted), local [gh, gw, D] (``[gh*gw, D]`` of a square grid)."""

    local: bool  # patch features on a grid, else one global vector

    formats = ("npy",)

    def decode(self, data: bytes, fmt: str, what: str, limits: DecodeLimits) -> Decoded:
        feature = decode_npy(data, what, limits)
        if not np.issubdtype(feature.dtype, np.floating):
            raise SampleError(SkipReason.BAD_VALUE, f"{what}: features must be floating point, got {feature.dtype}")
        if not self.local:
            if feature.ndim == 2 and feature.shape[0] == 1:
                feature = feature[0]
            if feature.ndim != 1 or feature.shape[0] == 0:
                raise SampleError(SkipReason.BAD_SHAPE, f"{what}: global features must be [D], got {feature.shape}")
        else:
            if feature.ndim == 2:  # [gh * gw, D] patch tokens of a square grid
                side = math.isqrt(feature.shape[0])
                if side * side != feature.shape[0]:
                    raise SampleError(
                        SkipReason.BAD_SHAPE,
                        f"{what}: {feature.shape[0]} patches do not form a square grid; store [gh, gw, D]",
                    )
                feature = feature.reshape(side, side, feature.shape[1])
            if feature.ndim != 3 or 0 in feature.shape:
                raise SampleError(SkipReason.BAD_SHAPE, f"{what}: local features must be [gh, gw, D], got {feature.shape}")
        feature = feature.astype(np.float32)
        _require_finite(feature, what)
        return Decoded(feature)

    def encode(self, value: Payload, options: EncodeOptions) -> dict[str, bytes]:
        assert isinstance(value, np.ndarray)
        return {"npy": npy_bytes(value.astype(options.feature_dtype))}
