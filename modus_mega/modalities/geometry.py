"""The ``warp`` column: how each modality follows one crop, flip and resize of its sample.

Pixel-aligned maps must stay aligned, so ``data/augment.py`` draws one ``Geometry`` per
sample and every modality applies it with the resampling its values allow:

- rgb: area (down) / linear (up) interpolation (``SMOOTH``).
- depth, normal, seg, sam_seg: nearest neighbour (never invent a depth, a normal or a class
  between two objects; ``NEAREST``); a horizontal flip negates the normal's x component
  (camera frame: x right; ``NORMAL``).
- canny, sam_edge: area interpolation of the edge map, then any coverage counts as edge, so
  thin edges survive downscaling (``COVERAGE``).
- detection / grounding boxes: shifted, mirrored and scaled with the image, clipped to it;
  a box with less than one pixel of width or height left is dropped (grounding entries with
  it); an empty grounding removes the modality.
- local features ([gh, gw, D] on a grid over the whole image): the cells whose centres lie
  in the crop are kept, mirrored on a flip; if none remain the modality is removed.
- global features describe the uncropped image and are kept as they are: crops are mild
  (``crop_min_side`` of each side at least) so they still describe the crop.
- text (captions, referring expressions): "left" and "right" are swapped on a flip so
  spatial language stays true ("the red ball left of the box").

A warp takes ``(value, geometry, source size (H, W) | None)`` and returns the new value, or
None when nothing of it is left.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from modus_mega.modalities.values import Detections, Groundings, Payload

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)(most)?\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


@dataclass(frozen=True)
class Geometry:
    """One sample's crop window (pixels of the source), flip and output size."""

    top: int
    left: int
    height: int  # crop height
    width: int  # crop width
    flip: bool  # mirror left-right after cropping
    out_height: int
    out_width: int


Warp = Callable[[Payload, Geometry, "tuple[int, int] | None"], "Payload | None"]


def warp_map(value: np.ndarray, g: Geometry, interpolation: int) -> np.ndarray:
    """Crop, mirror and resize a map [H, W, ...] with an OpenCV ``interpolation``."""
    crop = value[g.top : g.top + g.height, g.left : g.left + g.width]
    if g.flip:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (g.out_width, g.out_height), interpolation=interpolation)


@dataclass(frozen=True)
class MapWarp:
    """The warp of a 2D map: how it resamples, and whether a flip negates channel 0 (x)."""

    resample: Literal["smooth", "nearest", "coverage"]  # area/linear, nearest, area then any coverage
    negate_x_on_flip: bool = False  # normals: the mirror turns x right into x left

    def __call__(self, value: Payload, g: Geometry, size: tuple[int, int] | None) -> Payload:
        assert isinstance(value, np.ndarray)
        if self.resample == "coverage":
            return warp_map(value.astype(np.float32), g, cv2.INTER_AREA) > 0
        if self.resample == "smooth":
            shrinking = g.out_height * g.out_width < g.height * g.width
            return warp_map(value, g, cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        out = warp_map(value, g, cv2.INTER_NEAREST)
        if g.flip and self.negate_x_on_flip:
            out = out.copy()
            out[..., 0] = -out[..., 0]
        return out


SMOOTH = MapWarp("smooth")
NEAREST = MapWarp("nearest")
NORMAL = MapWarp("nearest", negate_x_on_flip=True)
COVERAGE = MapWarp("coverage")


def warp_mask(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """A validity mask bool [H, W] warped by nearest neighbour."""
    return warp_map(mask.astype(np.uint8), g, cv2.INTER_NEAREST).astype(bool)


def swap_left_right(text: str) -> str:
    """Mirror spatial language: left <-> right (also leftmost/rightmost), case kept."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)] + (m.group(2) or ""), text)


def _warp_boxes(boxes: np.ndarray, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N, 4] x0 y0 x1 y1 -> (warped boxes [M, 4], kept mask [N])."""
    b = boxes.astype(np.float64) - np.array([g.left, g.top, g.left, g.top])
    if g.flip:
        b = np.stack([g.width - b[:, 2], b[:, 1], g.width - b[:, 0], b[:, 3]], axis=1)
    b = np.clip(b, 0, [g.width, g.height, g.width, g.height])
    b *= np.array([g.out_width / g.width, g.out_height / g.height] * 2)
    kept = ((b[:, 2] - b[:, 0]) >= 1.0) & ((b[:, 3] - b[:, 1]) >= 1.0)
    return b[kept].astype(np.float32), kept


def warp_caption(value: Payload, g: Geometry, size: tuple[int, int] | None) -> Payload:
    """Captions: left and right swapped on a flip."""
    assert isinstance(value, list)
    return [swap_left_right(c) for c in value] if g.flip else value


def warp_detections(value: Payload, g: Geometry, size: tuple[int, int] | None) -> Payload:
    """Boxes follow the image; boxes cropped away are dropped with their classes and scores."""
    assert isinstance(value, Detections)
    boxes, kept = _warp_boxes(value.boxes, g)
    return Detections(
        boxes=boxes,
        classes=[c for c, k in zip(value.classes, kept) if k],
        scores=value.scores[kept],
        width=g.out_width,
        height=g.out_height,
    )


def warp_groundings(value: Payload, g: Geometry, size: tuple[int, int] | None) -> Payload | None:
    """Boxes follow the image, expressions are mirrored; None if every box is cropped away."""
    assert isinstance(value, Groundings)
    boxes, kept = _warp_boxes(value.boxes, g)
    if not kept.any():
        return None
    expressions = [e for e, k in zip(value.expressions, kept) if k]
    if g.flip:
        expressions = [swap_left_right(e) for e in expressions]
    return Groundings(boxes=boxes, expressions=expressions, width=g.out_width, height=g.out_height)


def keep(value: Payload, g: Geometry, size: tuple[int, int] | None) -> Payload:
    """Global features: unchanged (they describe the whole, mildly cropped, image)."""
    return value


def warp_local_features(value: Payload, g: Geometry, size: tuple[int, int] | None) -> Payload | None:
    """The grid cells [gh, gw, D] whose centres lie in the crop, mirrored on a flip; None if none do.

    Without a source image size the grid cannot be placed and is kept as it is.
    """
    assert isinstance(value, np.ndarray)
    if size is None:
        return value
    gh, gw = value.shape[:2]
    h, w = size
    centres_y = (np.arange(gh) + 0.5) * h / gh
    centres_x = (np.arange(gw) + 0.5) * w / gw
    rows = np.nonzero((centres_y >= g.top) & (centres_y < g.top + g.height))[0]
    cols = np.nonzero((centres_x >= g.left) & (centres_x < g.left + g.width))[0]
    if rows.size == 0 or cols.size == 0:
        return None
    out = value[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.ascontiguousarray(out[:, ::-1] if g.flip else out)
