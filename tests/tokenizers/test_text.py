"""Caption tokenizer: a tiny byte-level BPE trained offline, wrapped into the text id range."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modus_mega.config import load_config
from modus_mega.datasets import synth
from modus_mega.tokenizers.text import TextTokenizer, train_tiny_text_tokenizer
from modus_mega.vocab import build_vocabulary

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"


def _captions(count: int = 40) -> list[str]:
    config = synth.SynthConfig(image_size=16, feature_dim=4, feature_grid=1)
    texts: list[str] = []
    for i in range(count):
        values = synth.generate_sample(i, config)[2]
        texts += values["caption"]
        if "grounding" in values:
            texts += values["grounding"].expressions
    return texts


@pytest.fixture(scope="module")
def vocab_cfg():
    return load_config(TINY).model.vocab


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, vocab_cfg) -> Path:
    return train_tiny_text_tokenizer(_captions(), vocab_cfg.text_vocab_size, tmp_path_factory.mktemp("tok"))


def test_round_trip_in_the_text_range(tokenizer_dir: Path, vocab_cfg) -> None:
    vocab = build_vocabulary(vocab_cfg)
    tokenizer = TextTokenizer.from_pretrained(tokenizer_dir, vocab)
    assert 256 < len(tokenizer) <= vocab_cfg.text_vocab_size
    for text in _captions(5) + ["unseen wörds, émoji 🐍 and\ttabs\nnewlines", " leading space", ""]:
        ids = tokenizer.encode(text)
        assert all(i in vocab.text for i in ids)
        assert tokenizer.decode(ids) == text
    common = tokenizer.encode("a red sphere left of a blue cube.")
    assert len(common) < len("a red sphere left of a blue cube.") / 2  # merges were learnt


def test_training_is_deterministic(tmp_path: Path, tokenizer_dir: Path) -> None:
    again = train_tiny_text_tokenizer(_captions(), 512, tmp_path)
    assert (again / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()


def test_errors_name_the_fix(tokenizer_dir: Path, vocab_cfg, tmp_path: Path) -> None:
    small = build_vocabulary(dataclasses.replace(vocab_cfg, text_vocab_size=300))
    with pytest.raises(ValueError, match="text_vocab_size"):
        TextTokenizer.from_pretrained(tokenizer_dir, small)
    with pytest.raises(ValueError, match="does not exist"):
        TextTokenizer.from_pretrained(tmp_path / "missing", build_vocabulary(vocab_cfg))
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        train_tiny_text_tokenizer(["abc"], 100, tmp_path / "x")
    tokenizer = TextTokenizer.from_pretrained(tokenizer_dir, build_vocabulary(vocab_cfg))
    with pytest.raises(ValueError, match="outside the text range"):
        tokenizer.decode([1, vocab_cfg.text_vocab_size])
