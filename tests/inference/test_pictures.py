"""Pictures of generated outputs: boxes, PCA of features, point clouds, contact sheets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from modus_mega.inference.pictures import contact_sheet, depth_to_points, draw_boxes, pca_picture, write_point_cloud


def test_boxes_are_drawn_where_they_are() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    out = draw_boxes(image, np.array([[10, 20, 40, 50]]), [""])
    assert out[20, 25].any() and out[50, 25].any() and out[35, 10].any() and out[35, 40].any()  # the 4 edges
    assert not out[35, 25].any() and not out[5, 5].any()  # inside and outside stay untouched


def test_pca_picture_separates_clusters() -> None:
    features = np.zeros((4, 4, 16))
    features[:, :2] = np.random.default_rng(0).normal(size=16)  # left half one vector, right half another
    picture = pca_picture(features)
    assert picture.shape == (4, 4, 3) and picture.dtype == np.uint8
    assert (picture[:, 0] == picture[0, 0]).all() and not (picture[0, 0] == picture[0, 3]).all()


def test_point_cloud_follows_the_pinhole_camera(tmp_path: Path) -> None:
    depth = np.full((4, 6), 2.0)
    depth[0, 0] = 0.0  # invalid: left out
    depth[1, 1] = np.nan
    points, index = depth_to_points(depth, fov_degrees=90.0)
    assert len(points) == 22 and 0 not in index and 7 not in index
    focal = 3 / math.tan(math.radians(45))
    np.testing.assert_allclose(points[index.tolist().index(5)], [2 * (5.5 - 3) / focal, 2 * (0.5 - 2) / focal, 2.0])
    rgb = np.full((4, 6, 3), 7, np.uint8)
    assert write_point_cloud(tmp_path / "d.ply", depth, rgb, 90.0) == 22
    lines = (tmp_path / "d.ply").read_text().splitlines()
    assert "element vertex 22" in lines and lines[-1].endswith("7 7 7") and len(lines) == lines.index("end_header") + 23
    with pytest.raises(ValueError, match="field of view"):
        depth_to_points(depth, 180.0)


def test_contact_sheet_lays_out_rows_of_tiles() -> None:
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    sheet = contact_sheet([[("rgb", red), ("depth", blue)], [("rgb", red)]], tile=32)
    assert sheet.shape == (2 * (32 + 14 + 4) + 4, 2 * 36 + 4, 3)
    assert (sheet[4 + 14 + 16, 4 + 16] == [255, 0, 0]).all() and (sheet[4 + 14 + 16, 40 + 16] == [0, 0, 255]).all()
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([])
