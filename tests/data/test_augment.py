"""Crop, flip and resize keep every modality of a sample aligned."""

from __future__ import annotations

import numpy as np

from modus_mega.data.augment import apply_geometry, draw_geometry
from modus_mega.modalities.geometry import Geometry, swap_left_right
from modus_mega.data.shard_format import RawSample
from modus_mega.modalities.values import Detections, Groundings


def square_sample(h: int = 96, w: int = 128) -> RawSample:
    """A sample with one object (class 3) at rows 20:50, cols 30:70, facing +x."""
    seg = np.zeros((h, w), np.int32)
    seg[20:50, 30:70] = 3
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[seg == 3] = (255, 0, 0)
    depth = np.where(seg == 3, 2.0, 5.0).astype(np.float32)
    normal = np.zeros((h, w, 3), np.float32)
    normal[..., 2] = 1.0
    normal[seg == 3] = (0.6, 0.0, 0.8)
    edges = np.zeros((h, w), bool)
    edges[20, 30:70] = True
    box = np.array([[30, 20, 70, 50]], np.float32)
    grid = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    return RawSample(
        key="k", shard="", index=0,
        modalities={
            "rgb": rgb, "seg": seg, "depth": depth, "normal": normal, "sam_edge": edges,
            "detection": Detections(box, ["cube"], np.ones(1, np.float32), w, h),
            "grounding": Groundings(box, ["the cube on the left"], w, h),
            "caption": ["a red cube left of nothing"],
            "dinov2_local": grid, "clip_global": np.ones(8, np.float32),
        },
        valid={"depth": np.ones((h, w), bool)},
    )  # fmt: skip


def mask_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def test_maps_and_boxes_stay_aligned_under_random_geometry() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        sample = square_sample()
        g = draw_geometry((96, 128), rng, crop_min_side=0.7, hflip=True, max_pixels=64 * 64, multiple=16)
        out = apply_geometry(sample, g)
        seg = out.modalities["seg"]
        assert seg.shape == (g.out_height, g.out_width) and g.out_height % 16 == 0 and g.out_width % 16 == 0
        assert out.modalities["rgb"].shape[:2] == seg.shape == out.modalities["depth"].shape
        obj = seg == 3
        assert np.array_equal(obj, out.modalities["depth"] == 2.0), "depth and seg drifted apart"
        assert np.array_equal(obj, out.modalities["normal"][..., 2] == np.float32(0.8))
        x_sign = np.sign(out.modalities["normal"][obj][:, 0])
        assert np.all(x_sign == (-1 if g.flip else 1)), "normal x must flip with the image"
        det = out.modalities["detection"]
        if obj.sum() >= 4 and len(det.boxes):
            # nearest-neighbour resampling moves a mask edge by at most one output pixel
            assert np.abs(det.boxes[0] - mask_box(obj)).max() <= 1.5
        caption = out.modalities["caption"][0]
        assert ("right of" in caption) == g.flip


def test_local_features_follow_crop_and_flip() -> None:
    sample = square_sample(96, 128)
    g = Geometry(top=0, left=64, height=96, width=64, flip=True, out_height=96, out_width=64)
    out = apply_geometry(sample, g)
    grid = sample.modalities["dinov2_local"]
    assert np.array_equal(out.modalities["dinov2_local"], grid[:, 2:][:, ::-1])
    assert np.array_equal(out.modalities["clip_global"], sample.modalities["clip_global"])


def test_boxes_cropped_away_are_dropped_with_their_groundings() -> None:
    sample = square_sample()
    g = Geometry(top=60, left=0, height=36, width=128, flip=False, out_height=32, out_width=128)
    out = apply_geometry(sample, g)
    assert len(out.modalities["detection"].boxes) == 0
    assert "grounding" not in out.modalities


def test_swap_left_right() -> None:
    assert swap_left_right("Left of the leftmost cup, right side") == "Right of the rightmost cup, left side"
    assert swap_left_right("bright lefty") == "bright lefty"
