"""One random crop, flip and resize, applied identically to every modality of a sample.

Pixel-aligned maps must stay aligned, so the geometry is drawn once per sample and
applied to all of them, each with the resampling its values allow:

- rgb: area (down) / linear (up) interpolation.
- depth, normal, seg, sam_seg: nearest neighbour (never invent a depth, a normal or a class
  between two objects); the validity masks follow the same way. A horizontal flip negates the
  normal's x component (camera frame: x right).
- canny, sam_edge: area interpolation of the edge map, then any coverage counts as edge, so
  thin edges survive downscaling.
- detection / grounding boxes: shifted, mirrored and scaled with the image, clipped to it;
  a box with less than one pixel of width or height left is dropped (grounding entries with
  it); an empty grounding removes the modality.
- local features ([gh, gw, D] on a grid over the whole image): the cells whose centres lie
  in the crop are kept, mirrored on a flip; if none remain the modality is removed.
- global features describe the uncropped image and are kept as they are: crops are mild
  (``crop_min_side`` of each side at least) so they still describe the crop.
- text (captions, referring expressions): "left" and "right" are swapped on a flip so
  spatial language stays true ("the red ball left of the box").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import cv2
import numpy as np

from modus_mega.data.shards import Detections, Groundings, RawSample
from modus_mega.modalities import modality

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


def draw_geometry(
    size: tuple[int, int], rng: np.random.Generator, crop_min_side: float, hflip: bool, max_pixels: int, multiple: int
) -> Geometry:
    """Draw a crop keeping at least ``crop_min_side`` of each side, a flip with probability 1/2
    if ``hflip``, and an output size of at most ``max_pixels`` with sides multiples of ``multiple``."""
    h, w = size
    fraction = rng.uniform(crop_min_side, 1.0) if crop_min_side < 1.0 else 1.0
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    flip = bool(hflip and rng.random() < 0.5)
    scale = min(1.0, math.sqrt(max_pixels / (ch * cw)))
    out_h = max(multiple, int(ch * scale) // multiple * multiple)
    out_w = max(multiple, int(cw * scale) // multiple * multiple)
    return Geometry(top, left, ch, cw, flip, out_h, out_w)


def _warp_map(value: np.ndarray, g: Geometry, interpolation: int) -> np.ndarray:
    crop = value[g.top : g.top + g.height, g.left : g.left + g.width]
    if g.flip:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop), (g.out_width, g.out_height), interpolation=interpolation)


def _warp_rgb(value: np.ndarray, g: Geometry) -> np.ndarray:
    shrinking = g.out_height * g.out_width < g.height * g.width
    return _warp_map(value, g, cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _warp_edges(value: np.ndarray, g: Geometry) -> np.ndarray:
    return _warp_map(value.astype(np.float32), g, cv2.INTER_AREA) > 0


def _warp_normal(value: np.ndarray, g: Geometry) -> np.ndarray:
    out = _warp_map(value, g, cv2.INTER_NEAREST)
    if g.flip:
        out = out.copy()
        out[..., 0] = -out[..., 0]
    return out


def _warp_boxes(boxes: np.ndarray, g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N, 4] x0 y0 x1 y1 -> (warped boxes [M, 4], kept mask [N])."""
    b = boxes.astype(np.float64) - np.array([g.left, g.top, g.left, g.top])
    if g.flip:
        b = np.stack([g.width - b[:, 2], b[:, 1], g.width - b[:, 0], b[:, 3]], axis=1)
    b = np.clip(b, 0, [g.width, g.height, g.width, g.height])
    b *= np.array([g.out_width / g.width, g.out_height / g.height] * 2)
    kept = ((b[:, 2] - b[:, 0]) >= 1.0) & ((b[:, 3] - b[:, 1]) >= 1.0)
    return b[kept].astype(np.float32), kept


def _warp_local_features(grid: np.ndarray, g: Geometry, size: tuple[int, int]) -> np.ndarray | None:
    gh, gw = grid.shape[:2]
    h, w = size
    centres_y = (np.arange(gh) + 0.5) * h / gh
    centres_x = (np.arange(gw) + 0.5) * w / gw
    rows = np.nonzero((centres_y >= g.top) & (centres_y < g.top + g.height))[0]
    cols = np.nonzero((centres_x >= g.left) & (centres_x < g.left + g.width))[0]
    if rows.size == 0 or cols.size == 0:
        return None
    out = grid[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return np.ascontiguousarray(out[:, ::-1] if g.flip else out)


def swap_left_right(text: str) -> str:
    """Mirror spatial language: left <-> right (also leftmost/rightmost), case kept."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(1)] + (m.group(2) or ""), text)


def apply_geometry(sample: RawSample, g: Geometry) -> RawSample:
    """``sample`` with ``g`` applied to every modality (see the module docstring)."""
    size = sample.image_size
    modalities, valid = {}, {}
    for name, value in sample.modalities.items():
        kind = modality(name).kind
        if name == "rgb":
            modalities[name] = _warp_rgb(value, g)
        elif name in ("canny", "sam_edge"):
            modalities[name] = _warp_edges(value, g)
        elif name == "normal":
            modalities[name] = _warp_normal(value, g)
        elif kind == "image":  # depth, seg, sam_seg
            modalities[name] = _warp_map(value, g, cv2.INTER_NEAREST)
        elif name == "detection":
            boxes, kept = _warp_boxes(value.boxes, g)
            modalities[name] = Detections(
                boxes=boxes,
                classes=[c for c, k in zip(value.classes, kept) if k],
                scores=value.scores[kept],
                width=g.out_width,
                height=g.out_height,
            )
        elif name == "grounding":
            boxes, kept = _warp_boxes(value.boxes, g)
            if kept.any():
                expressions = [e for e, k in zip(value.expressions, kept) if k]
                if g.flip:
                    expressions = [swap_left_right(e) for e in expressions]
                modalities[name] = Groundings(boxes=boxes, expressions=expressions, width=g.out_width, height=g.out_height)
        elif name == "caption":
            modalities[name] = [swap_left_right(c) for c in value] if g.flip else value
        elif kind == "feature_local" and size is not None:
            warped = _warp_local_features(value, g, size)
            if warped is not None:
                modalities[name] = warped
        else:  # global features
            modalities[name] = value
    for name, mask in sample.valid.items():
        valid[name] = _warp_map(mask.astype(np.uint8), g, cv2.INTER_NEAREST).astype(bool)
    return replace(sample, modalities=modalities, valid=valid)


def random_geometry_for(
    sample: RawSample, rng: np.random.Generator, crop_min_side: float, hflip: bool, max_pixels: int, multiple: int
) -> Geometry | None:
    """A geometry for ``sample``, or None if it has no 2D modality to take the size from."""
    size = sample.image_size
    if size is None:
        size = _annotation_size(sample)
    if size is None:
        return None
    return draw_geometry(size, rng, crop_min_side, hflip, max_pixels, multiple)


def _annotation_size(sample: RawSample) -> tuple[int, int] | None:
    for name in ("detection", "grounding"):
        value = sample.modalities.get(name)
        if value is not None:
            return value.height, value.width
    return None
