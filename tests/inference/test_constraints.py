"""Constrained 1D decoding: ground-truth segments are accepted, random models always produce parsable ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modus_mega.config import load_config
from modus_mega.modalities.values import Detections
from modus_mega.inference.constraints import (
    DetectionGrammar,
    FeatureGrammar,
    Grammar,
    GroundingGrammar,
    TextGrammar,
    accepts,
)
from modus_mega.inference.token_sampling import TokenSampling, sample_token
from modus_mega.tokenizers.boxes import BoxTokenizer
from modus_mega.tokenizers.text import TextTokenizer, train_tiny_text_tokenizer
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.vocab import Vocabulary, build_vocabulary
from tests.conftest import REPO

CLASSES = ["sphere", "cube", "cylinder", "red cone"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Vocabulary, TextTokenizer, BoxTokenizer]:
    cfg = load_config(REPO / "configs" / "tiny.json").model.vocab
    vocab = build_vocabulary(cfg)
    texts = [f"a {c} left of the {d}" for c in CLASSES for d in CLASSES]
    text = TextTokenizer.from_pretrained(train_tiny_text_tokenizer(texts, cfg.text_vocab_size, tmp_path_factory.mktemp("tok")), vocab)
    return vocab, text, BoxTokenizer(vocab, text)


def _generate(grammar: Grammar, seed: int, max_len: int = 200) -> list[int]:
    """Sample from random logits under ``grammar`` until the end token."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    end = grammar.vocab.end_of_segment_id
    while not ids or ids[-1] != end:
        assert len(ids) < max_len, "a grammar must bound the segment's length"
        logits = torch.randn(grammar.vocab.padded_size, generator=gen) * 3
        ids.append(sample_token(logits, grammar.allowed(ids), TokenSampling(temperature=1.0), gen))
    return ids


def test_ground_truth_segments_are_accepted_and_decode_to_the_payload(tokenizers) -> None:
    vocab, text, boxes = tokenizers
    end = vocab.end_of_segment_id
    caption = text.encode("a cube left of the sphere")
    assert accepts(TextGrammar(vocab), caption + [end])
    assert text.decode(caption).strip() == "a cube left of the sphere"

    det = Detections(
        boxes=np.array([[2, 3, 30, 40], [10, 12, 60, 50]], np.float32), classes=["red cone", "cube"],
        scores=np.ones(2, np.float32), width=64, height=64,
    )  # fmt: skip
    det_ids = boxes.encode_detections(det)
    assert accepts(DetectionGrammar(vocab), det_ids + [end])
    decoded = boxes.decode_detections(det_ids, 64, 64)
    assert sorted(decoded.classes) == sorted(det.classes)
    half_bin = 64 / len(vocab.coordinates) / 2
    for box, cls in zip(det.boxes, det.classes):
        assert np.abs(decoded.boxes[decoded.classes.index(cls)] - box).max() <= half_bin + 1e-4
    assert accepts(DetectionGrammar(vocab), [end])  # no object is a valid detection

    expression = text.encode("the red cone")
    ground_ids = boxes.encode_grounding("the red cone", np.array([5, 6, 20, 30], np.float32), 64, 64)
    assert accepts(GroundingGrammar(vocab, tuple(expression)), ground_ids + [end])
    assert not accepts(GroundingGrammar(vocab, tuple(text.encode("the cube"))), ground_ids + [end])

    quantizer = FeatureQuantizer("dinov2_local", torch.randn(1, len(vocab.codebooks["dinov2_local"]), 8))
    features = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    feature_ids = quantizer.tokenize(features, vocab)
    grammar = FeatureGrammar(vocab, vocab.codebooks["dinov2_local"], 6)
    assert accepts(grammar, feature_ids + [end])
    assert not accepts(grammar, feature_ids[:-1] + [end])  # one patch short
    np.testing.assert_allclose(quantizer.detokenize(feature_ids, vocab, (2, 3)), quantizer.decode(quantizer.encode(features)))


@pytest.mark.parametrize("seed", range(6))
def test_random_models_always_produce_parsable_segments(tokenizers, seed: int) -> None:
    vocab, text, boxes = tokenizers
    caption = _generate(TextGrammar(vocab, max_tokens=12), seed)
    assert 2 <= len(caption) <= 13 and all(i in vocab.text for i in caption[:-1])
    text.decode(caption[:-1])

    det = boxes.decode_detections(_generate(DetectionGrammar(vocab, max_boxes=4), seed), 64, 64)
    assert det.boxes.shape[0] == len(det.classes) <= 4  # a random model's class text may decode to anything
    assert bool((det.boxes[:, 2:] >= det.boxes[:, :2]).all())  # far corners never before near ones

    expression = tuple(text.encode("the cube"))
    phrase, box = boxes.decode_grounding(_generate(GroundingGrammar(vocab, expression), seed), 64, 64)
    assert phrase == "the cube" and box is not None and box[2] >= box[0] and box[3] >= box[1]

    quantizer = FeatureQuantizer("clip_global", torch.randn(3, len(vocab.codebooks["clip_global"]), 8))
    ids = _generate(FeatureGrammar(vocab, vocab.codebooks["clip_global"], quantizer.num_stages), seed)
    assert len(ids) == quantizer.num_stages + 1
    assert quantizer.detokenize(ids[:-1], vocab).shape == (8,)


def test_detection_grammar_states(tokenizers) -> None:
    vocab, _, _ = tokenizers
    grammar = DetectionGrammar(vocab, max_boxes=1, max_class_tokens=2)
    c, t, end = vocab.coordinates.start, vocab.text.start + 5, vocab.end_of_segment_id
    allowed = lambda prefix: grammar.allowed(prefix)  # noqa: E731
    assert allowed([])[c] and allowed([])[end] and not allowed([])[t]
    assert allowed([c, c])[c] and not allowed([c, c])[end] and not allowed([c, c])[t]
    assert not allowed([c + 5, c + 2, c + 7])[c + 1] and allowed([c + 5, c + 2, c + 7])[c + 2]  # y1 >= y0 = bin 2
    assert not allowed([c + 5, c])[c + 4] and allowed([c + 5, c])[c + 5]  # x1 >= x0 = bin 5
    assert allowed([c] * 4)[t] and not allowed([c] * 4)[end] and not allowed([c] * 4)[c]
    after_class = allowed([c] * 4 + [t])
    assert after_class[t] and after_class[end] and not after_class[c]  # max_boxes = 1: no second box
    assert not allowed([c] * 4 + [t, t])[t]  # max_class_tokens = 2
    assert not allowed([])[vocab.vision_start_id] and not allowed([])[vocab.start_markers.start]
