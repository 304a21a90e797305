"""Outputs for people: decoded payloads, the depth point cloud, boxes on the right picture, contact-sheet rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modus_mega.config import load_config
from modus_mega.data.documents import Sample
from modus_mega.inference.generator import GeneratedTarget
from modus_mega.inference.outputs import DEPTH_RANGE_M, OutputContext, Request, write_request
from modus_mega.modalities import render_for_people
from modus_mega.modalities.pictures import depth_to_image
from modus_mega.modalities.values import Detections
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.vocab import build_vocabulary
from tests.conftest import REPO

SIZE = 32


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> ModalityTokenizers:
    vocab = build_vocabulary(load_config(REPO / "configs" / "tiny.json").model.vocab)
    text_dir = train_tiny_text_tokenizer(["a red cube", "a blue sphere"] * 4, 300, tmp_path_factory.mktemp("tok"))
    tokenizers = ModalityTokenizers.load(vocab, text_dir, None)
    codebook = torch.randn(1, len(vocab.codebooks["dinov2_local"]), 6, generator=torch.Generator().manual_seed(0))
    tokenizers.quantizers["dinov2_local"] = FeatureQuantizer("dinov2_local", codebook)
    return tokenizers


def test_request_files_decode_to_what_was_generated(tokenizers: ModalityTokenizers, tmp_path: Path) -> None:
    rgb = torch.full((3, SIZE, SIZE), -0.5)
    depth = np.full((SIZE, SIZE), 4.0, np.float32)  # the farthest depth maps to +1, as invalid pixels do
    depth[:, :22] = 3.0
    depth[:, :11] = 2.0
    depth[:4] = 0.0  # invalid rows: the far end, left out of the cloud
    depth_image = torch.from_numpy(depth_to_image(depth)).float()
    boxes = np.array([[4.0, 6.0, 20.0, 28.0]], np.float32)
    detection_ids = tokenizers.encode("detection", Detections(boxes, ["cube"], np.ones(1, np.float32), SIZE, SIZE), None)
    local = tokenizers.quantizers["dinov2_local"].codebooks[0, :16].reshape(4, 4, 6).numpy()
    local_ids = tokenizers.encode("dinov2_local", local, None)
    targets = [
        GeneratedTarget("depth", image=depth_image),
        GeneratedTarget("detection", ids=detection_ids),
        GeneratedTarget("dinov2_local", ids=local_ids),
    ]
    truth = Sample(key="truth", images={"depth": depth_image})
    request = Request(Sample(key="r", images={"rgb": rgb}), ["rgb"], ["depth", "detection", "dinov2_local"], truth=truth)
    row = write_request(tmp_path, request, targets, OutputContext(tokenizers, (SIZE, SIZE), (4, 4)))

    assert [label for label, _ in row] == ["cond rgb", "gen depth", "gen detection", "gen dinov2_local", "truth depth"]
    header, _, body = (tmp_path / "depth.ply").read_text().partition("end_header\n")
    points = np.array([line.split()[:3] for line in body.splitlines()], dtype=np.float64)
    assert int(re.search(r"element vertex (\d+)", header).group(1)) == len(points) == (SIZE - 4) * 22
    depths = sorted(set(np.round(points[:, 2], 4)))
    assert len(depths) == 2 and depths[0] == DEPTH_RANGE_M[0] and depths[1] < DEPTH_RANGE_M[1]
    half_bin = SIZE / len(tokenizers.vocab.coordinates) / 2 + 1e-4
    saved = json.loads((tmp_path / "detection.json").read_text())
    assert saved["classes"] == ["cube"] and np.abs(np.array(saved["boxes"]) - boxes).max() <= half_bin
    drawn = np.asarray(Image.open(tmp_path / "detection.png"))
    assert drawn.shape == (SIZE, SIZE, 3) and not np.array_equal(drawn, render_for_people("rgb", rgb.numpy()))
    assert np.allclose(np.load(tmp_path / "dinov2_local.npy"), local)
    assert Image.open(tmp_path / "dinov2_local.png").size == (SIZE, SIZE)
