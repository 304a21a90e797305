"""The ``picture`` column of the 2D modalities: model image, snap, and a view for people.

Every 2D modality enters the model as an RGB-like image, so one frozen autoencoder and one
vision tower serve all seven. The mappings (``docs/DATA.md`` has the table):

- rgb: ``x / 127.5 - 1``.
- depth: log-depth, normalised per image to [-1, 1] between the nearest and farthest valid
  depth (or a given ``near``/``far``), replicated to 3 channels; invalid pixels (sky, sensor
  holes) map to +1, the far end. Invertible given the (near, far) used.
- normal: the ``(n + 1) / 2`` colour mapping rescaled to [-1, 1], which is ``n`` itself, so
  channel 0 is n_x (negate it on a horizontal flip); invalid pixels are 0 (grey).
- seg, sam_seg: a fixed palette (the PASCAL VOC bit-interleaved colour map, extended to any
  id) so the same id is always the same colour; decoded by nearest palette colour.
- canny, sam_edge: grey, edge = +1, background = -1, replicated to 3 channels.

A generated image is *snapped* back to its training form where that is discrete (labels to
the nearest palette colour, edges to +-1; DESIGN §8) before it is re-encoded as a
condition, and *shown* to people as uint8 RGB (depth through a colour map, normals as their
colour mapping, labels in their palette, edges white on black).

Images are float32 [3, H, W]; values follow the types of ``modalities/codecs.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

_MIN_DEPTH = 1e-3  # metres; floor before the logarithm


def _chw(image_hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_hwc.transpose(2, 0, 1), dtype=np.float32)


def _replicate(plane_hw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(plane_hw.astype(np.float32), (3, *plane_hw.shape)))


def rgb_to_image(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return _chw(rgb.astype(np.float32) / 127.5 - 1.0)


def image_to_rgb(image: np.ndarray) -> np.ndarray:
    """float [3, H, W] in [-1, 1] -> uint8 [H, W, 3]."""
    return np.clip(np.round((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def depth_range(depth: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, float]:
    """(near, far) in metres over the valid pixels: the per-image normalisation range."""
    mask = depth > 0 if valid is None else valid & (depth > 0)
    if not mask.any():
        return 1.0, 1.0
    values = depth[mask]
    return max(float(values.min()), _MIN_DEPTH), max(float(values.max()), _MIN_DEPTH)


def depth_to_image(
    depth: np.ndarray, valid: np.ndarray | None = None, near: float | None = None, far: float | None = None
) -> np.ndarray:
    """Depth float [H, W] metres -> float32 [3, H, W]: normalised log-depth, invalid = +1.

    ``near``/``far`` default to the image's own valid range (``depth_range``); values outside
    a given range are clipped.
    """
    mask = depth > 0 if valid is None else valid & (depth > 0)
    if near is None or far is None:
        near, far = depth_range(depth, mask)
    if not 0 < near <= far:
        raise ValueError(f"depth range must satisfy 0 < near <= far, got near={near}, far={far}")
    log_near, log_far = np.log(near), np.log(far)
    log_depth = np.log(np.maximum(depth, _MIN_DEPTH))
    scaled = (log_depth - log_near) / max(log_far - log_near, 1e-12)  # [0, 1] over the range
    plane = np.where(mask, np.clip(scaled, 0.0, 1.0) * 2.0 - 1.0, 1.0)
    return _replicate(plane)


def image_to_depth(image: np.ndarray, near: float, far: float) -> np.ndarray:
    """float [3, H, W] -> depth float32 [H, W] metres in [near, far] (channel mean decoded)."""
    scaled = (np.clip(image.mean(axis=0), -1.0, 1.0) + 1.0) / 2.0
    return np.exp(np.log(near) + scaled * (np.log(far) - np.log(near))).astype(np.float32)


def normal_to_image(normal: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Unit normals float [H, W, 3] -> float32 [3, H, W] (= n; invalid pixels 0)."""
    if valid is not None:
        normal = np.where(valid[..., None], normal, 0.0)
    return _chw(np.clip(normal, -1.0, 1.0))


def image_to_normal(image: np.ndarray) -> np.ndarray:
    """float [3, H, W] -> unit normals float32 [H, W, 3] (re-normalised; ~0 vectors stay 0)."""
    normal = image.transpose(1, 2, 0).astype(np.float32)
    norm = np.linalg.norm(normal, axis=-1, keepdims=True)
    return np.where(norm > 1e-3, normal / np.maximum(norm, 1e-3), 0.0).astype(np.float32)


def palette_colours(ids: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] colours of integer ``ids``: the PASCAL VOC colour map, any id < 2^24.

    The bits of an id are interleaved into r, g, b from the most significant bit down, so
    small ids get saturated, well separated colours (1 -> dark red, 2 -> dark green, ...).
    """
    remaining = ids.astype(np.int64)
    colours = np.zeros((*ids.shape, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[..., channel] |= ((remaining >> channel) & 1) << shift
        remaining = remaining >> 3
    return colours.astype(np.uint8)


def palette(num_ids: int) -> np.ndarray:
    """uint8 [num_ids, 3]: the colours of ids 0 .. num_ids - 1."""
    return palette_colours(np.arange(num_ids))


def labels_to_image(labels: np.ndarray) -> np.ndarray:
    """Integer ids [H, W] (ids < 2^24) -> float32 [3, H, W] palette colours in [-1, 1]."""
    if labels.size and (labels.min() < 0 or labels.max() >= 1 << 24):
        raise ValueError(f"label ids must lie in [0, 2^24) to be rendered, got [{labels.min()}, {labels.max()}]")
    top = int(labels.max(initial=0))
    colours = palette(top + 1)[labels] if top < 1 << 16 else palette_colours(labels)  # table lookup when small
    return rgb_to_image(colours)


def image_to_labels(image: np.ndarray, num_ids: int) -> np.ndarray:
    """float [3, H, W] -> int32 [H, W]: the id in [0, num_ids) of the nearest palette colour."""
    colours = palette(num_ids).astype(np.float32) / 127.5 - 1.0  # [num_ids, 3]
    pixels = image.reshape(3, -1).T  # [H * W, 3]
    distance = (pixels**2).sum(1, keepdims=True) - 2.0 * pixels @ colours.T + (colours**2).sum(1)
    return distance.argmin(axis=1).reshape(image.shape[1:]).astype(np.int32)


def edges_to_image(edges: np.ndarray) -> np.ndarray:
    """bool [H, W] -> float32 [3, H, W]: edge +1, background -1."""
    return _replicate(np.where(edges, 1.0, -1.0))


def image_to_edges(image: np.ndarray) -> np.ndarray:
    """float [3, H, W] -> bool [H, W]: channel mean above 0."""
    return image.mean(axis=0) > 0.0


SNAP_LABEL_IDS = 256  # a generated label map snaps to the palette colours of ids [0, 256)


def _identity(image: np.ndarray) -> np.ndarray:
    return image


def snap_labels(image: np.ndarray) -> np.ndarray:
    """float [3, H, W] -> the image of its nearest palette ids (ids below ``SNAP_LABEL_IDS``)."""
    return labels_to_image(image_to_labels(image, SNAP_LABEL_IDS))


def snap_edges(image: np.ndarray) -> np.ndarray:
    """float [3, H, W] -> the binary edge image (+1 edge, -1 background)."""
    return edges_to_image(image_to_edges(image))


def depth_for_people(image: np.ndarray) -> np.ndarray:
    """float [3, H, W] normalised log-depth -> uint8 [H, W, 3]: turbo colour map, near = red, far = blue."""
    nearness = np.clip((1.0 - image.mean(axis=0)) * 127.5, 0, 255).astype(np.uint8)  # [H, W], near = 255
    return cv2.applyColorMap(nearness, cv2.COLORMAP_TURBO)[..., ::-1].copy()  # BGR -> RGB


@dataclass(frozen=True)
class Picture:
    """How one 2D modality becomes the model's image, snaps back to its training form, and is shown."""

    to_image: Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # (value, valid [H, W] | None) -> [3, H, W]
    snap: Callable[[np.ndarray], np.ndarray]  # generated [3, H, W] -> nearest training-form [3, H, W]
    for_people: Callable[[np.ndarray], np.ndarray]  # [3, H, W] in [-1, 1] -> uint8 [H, W, 3]

    def show(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] of a model image (generated or rendered), snapped first."""
        return self.for_people(self.snap(image))


RGB_PICTURE = Picture(to_image=lambda value, valid: rgb_to_image(value), snap=_identity, for_people=image_to_rgb)
DEPTH_PICTURE = Picture(to_image=depth_to_image, snap=_identity, for_people=depth_for_people)
NORMAL_PICTURE = Picture(to_image=normal_to_image, snap=_identity, for_people=image_to_rgb)
LABELS_PICTURE = Picture(to_image=lambda value, valid: labels_to_image(value), snap=snap_labels, for_people=image_to_rgb)
EDGES_PICTURE = Picture(to_image=lambda value, valid: edges_to_image(value), snap=snap_edges, for_people=image_to_rgb)
