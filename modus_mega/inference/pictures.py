"""Generated outputs as things a person can look at: boxes on images, feature maps, point clouds, contact sheets.

Each 2D modality's own rendering (depth colormap, normals, label palette, edges) lives in its
row of the modality table; this module composes those pictures and adds what is not a map:

- ``draw_boxes``: detection / grounding boxes with their labels, on the image they describe;
- ``pca_picture``: local features [h, w, D] as RGB, their first three principal components;
- ``write_point_cloud``: a depth map (with its RGB) as an ASCII ``.ply`` through a
  pinhole camera of ``fov_degrees`` horizontal field of view (default 60, a common
  phone-camera value; the synthetic renderer's camera is documented in docs/DATA.md), centred
  principal point, square pixels; points with depth <= 0 or non-finite are left out;
- ``contact_sheet``: one row per request, labelled tiles (conditions | generated | ground truth).

Images are uint8 [H, W, 3] numpy arrays.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_FOV_DEGREES = 60.0
_BOX_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180))


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """``image`` [H, W, 3] uint8 with pixel boxes [N, 4] (x0, y0, x1, y1) outlined and labelled."""
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (box, label) in enumerate(zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels)):
        colour = _BOX_COLOURS[i % len(_BOX_COLOURS)]
        x0, y0, x1, y1 = box.tolist()
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=max(1, image.shape[1] // 128))
        if label:
            draw.text((x0 + 2, y0 + 1), label, fill=colour, font=font)
    return np.asarray(canvas)


def pca_picture(features: np.ndarray) -> np.ndarray:
    """Local features [h, w, D] -> uint8 [h, w, 3]: the first 3 principal components, each min-max scaled.

    With fewer than 3 components of variance the missing channels are 0.
    """
    h, w, d = features.shape
    x = features.reshape(-1, d).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # rows of vt: principal directions
    components = x @ vt[:3].T  # [h*w, <=3]
    picture = np.zeros((h * w, 3))
    lo, hi = components.min(0), components.max(0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    picture[:, : components.shape[1]] = (components - lo) / span
    return (picture.reshape(h, w, 3) * 255).round().astype(np.uint8)


def depth_to_points(depth: np.ndarray, fov_degrees: float = DEFAULT_FOV_DEGREES) -> tuple[np.ndarray, np.ndarray]:
    """Camera-space points [N, 3] (x right, y down, z forward) and their pixel indices [N] from depth [H, W].

    Pinhole: focal length ``f = (W / 2) / tan(fov / 2)`` in pixels, principal point at the image
    centre; the point of pixel (r, c) is ``z * ((c + 0.5 - W/2) / f, (r + 0.5 - H/2) / f, 1)``.
    """
    if not 0.0 < fov_degrees < 180.0:
        raise ValueError(f"the camera's field of view must lie in (0, 180) degrees, got {fov_degrees}")
    height, width = depth.shape
    focal = (width / 2) / math.tan(math.radians(fov_degrees) / 2)
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    z = depth.astype(np.float64)
    valid = np.isfinite(z) & (z > 0)
    points = np.stack([(cols - width / 2) / focal * z, (rows - height / 2) / focal * z, z], axis=-1)
    return points[valid], np.flatnonzero(valid)


def write_point_cloud(path: Path, depth: np.ndarray, rgb: np.ndarray | None = None, fov_degrees: float = DEFAULT_FOV_DEGREES) -> int:
    """Write ``depth`` [H, W] (with colours from ``rgb`` [H, W, 3] uint8, else grey) as an ASCII PLY; returns the point count."""
    points, index = depth_to_points(depth, fov_degrees)
    colours = (rgb.reshape(-1, 3)[index] if rgb is not None else np.full((len(index), 3), 200)).astype(np.uint8)
    header = (
        "ply\nformat ascii 1.0\ncomment modus_mega depth point cloud, pinhole camera, "
        f"horizontal fov {fov_degrees} degrees\nelement vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    rows = "".join(f"{x:.6g} {y:.6g} {z:.6g} {r} {g} {b}\n" for (x, y, z), (r, g, b) in zip(points.tolist(), colours.tolist()))
    path.write_text(header + rows)
    return len(points)


def contact_sheet(rows: Sequence[Sequence[tuple[str, np.ndarray]]], tile: int = 160) -> np.ndarray:
    """One row per request of labelled tiles ``(label, image [H, W, 3] uint8)``, each resized to ``tile`` px."""
    if not rows or not any(rows):
        raise ValueError("a contact sheet needs at least one labelled picture")
    label_height = 14
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, len(rows) * (tile + label_height + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (label, picture) in enumerate(row):
            x, y = 4 + c * (tile + 4), 4 + r * (tile + label_height + 4)
            draw.text((x, y), label[: tile // 6], fill=(0, 0, 0), font=font)
            image = Image.fromarray(np.ascontiguousarray(picture)).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(image, (x, y + label_height))
    return np.asarray(sheet)
