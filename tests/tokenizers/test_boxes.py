"""Box tokenizer: coordinates within half a bin, detection order, class and expression text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from modus_mega.config import load_config
from modus_mega.modalities.values import Detections, Groundings
from modus_mega.tokenizers.boxes import BoxTokenizer, dequantize_coordinates, quantize_coordinates
from modus_mega.tokenizers.text import TextTokenizer, train_tiny_text_tokenizer
from modus_mega.vocab import build_vocabulary

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"
CLASSES = ["sphere", "cube", "cylinder", "traffic light", "person"]


@pytest.fixture(scope="module", params=[100, 1000], ids=["bins100", "bins1000"])
def tokenizer(request, tmp_path_factory) -> BoxTokenizer:
    cfg = dataclasses.replace(load_config(TINY).model.vocab, coordinate_bins=request.param)
    vocab = build_vocabulary(cfg)
    texts = [f"a {c} next to the {d}" for c in CLASSES for d in CLASSES]
    text_dir = train_tiny_text_tokenizer(texts, cfg.text_vocab_size, tmp_path_factory.mktemp("tok"))
    return BoxTokenizer(vocab, TextTokenizer.from_pretrained(text_dir, vocab))


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    corners = rng.uniform(0, 1, size=(n, 2, 2)) * np.array([width, height])
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)
    boxes[0] = [0, 0, width, height]  # the extreme coordinates
    return boxes.astype(np.float32)


def test_quantisation_error_is_at_most_half_a_bin() -> None:
    coords = np.concatenate([np.linspace(0, 1, 10_001), [0.0, 1.0, 0.5 - 1e-9]])
    for bins in (1, 7, 100, 1000):
        q = quantize_coordinates(coords, bins)
        assert q.min() >= 0 and q.max() <= bins - 1
        assert np.abs(dequantize_coordinates(q, bins) - coords).max() <= 0.5 / bins + 1e-6


def test_box_round_trip_within_half_a_bin(tokenizer: BoxTokenizer) -> None:
    rng = np.random.default_rng(0)
    width, height = 640, 480
    boxes = _random_boxes(rng, 200, width, height)
    ids = tokenizer.encode_boxes(boxes, width, height)
    assert len(ids) == 4 * len(boxes)
    assert all(i in tokenizer.vocab.coordinates for i in ids)
    decoded = tokenizer.decode_boxes(ids, width, height)
    half_bin = 0.5 / tokenizer.num_bins * np.array([width, height, width, height])
    assert (np.abs(decoded - boxes) <= half_bin + 1e-3).all()


def test_detection_round_trip_and_order(tokenizer: BoxTokenizer) -> None:
    rng = np.random.default_rng(1)
    width, height = 300, 200
    boxes = _random_boxes(rng, 12, width, height)
    classes = [CLASSES[i % len(CLASSES)] for i in range(12)]
    scores = np.linspace(0.1, 1.0, 12).astype(np.float32)
    detections = Detections(boxes, classes, scores, width, height)
    ids = tokenizer.encode_detections(detections)
    assert all(i in tokenizer.vocab.coordinates or i in tokenizer.vocab.text for i in ids)
    decoded = tokenizer.decode_detections(ids + [tokenizer.vocab.end_of_segment_id, 5, 6], width, height)
    # Independent reference order: distance of the normalised (x0, y0) corner to the origin.
    distance = [np.hypot(b[0] / width, b[1] / height) for b in boxes]
    order = sorted(range(12), key=lambda i: distance[i])
    assert decoded.classes == [classes[i] for i in order]
    half_bin = 0.5 / tokenizer.num_bins * np.array([width, height, width, height])
    assert (np.abs(decoded.boxes - boxes[order]) <= half_bin + 1e-3).all()
    kept = tokenizer.decode_detections(tokenizer.encode_detections(detections, min_score=0.5), width, height)
    assert len(kept.classes) == int((scores >= 0.5).sum())


def test_grounding_round_trip(tokenizer: BoxTokenizer) -> None:
    box = np.array([10.0, 20.0, 110.0, 90.0], dtype=np.float32)
    ids = tokenizer.encode_grounding("the person next to the traffic light", box, 128, 96)
    assert all(i in tokenizer.vocab.text for i in ids[:-4])
    assert all(i in tokenizer.vocab.coordinates for i in ids[-4:])
    expression, decoded = tokenizer.decode_grounding(ids, 128, 96)
    assert expression == "the person next to the traffic light"
    assert decoded is not None
    assert (np.abs(decoded - box) <= 0.5 / tokenizer.num_bins * np.array([128, 96, 128, 96]) + 1e-3).all()
    groundings = Groundings(np.stack([box, box / 2]), ["the cube", "the sphere"], 128, 96)
    assert tokenizer.decode_grounding(tokenizer.encode_groundings(groundings, 1), 128, 96)[0] == "the sphere"
    assert tokenizer.decode_grounding(ids[:-1], 128, 96)[1] is None  # incomplete box


def test_malformed_and_foreign_ids(tokenizer: BoxTokenizer) -> None:
    c = tokenizer.vocab.coordinates.start
    text = tokenizer.text.encode(" cube")
    ids = [c, c + 1, c + 2] + text + [c, c + 1, c + 2, c + 3] + text  # first group has 3 coordinates
    decoded = tokenizer.decode_detections(ids, 100, 100)
    assert decoded.classes == ["cube"] and decoded.boxes.shape == (1, 4)
    with pytest.raises(ValueError, match="neither text"):
        tokenizer.decode_detections([c, c, c, c, tokenizer.vocab.start_markers.start], 100, 100)
    with pytest.raises(ValueError, match="coordinate ids"):
        tokenizer.decode_boxes([0, 1, 2, 3], 100, 100)
