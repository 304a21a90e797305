"""Shared fixtures of the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from modus_mega.convert.hf import save_pretrained
from modus_mega.datasets import synth
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from tests.convert.helpers import random_reference, tiny_config


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model with its VAE and a caption tokenizer trained on synthetic captions."""
    root = tmp_path_factory.mktemp("bench")
    cfg = tiny_config()
    config = synth.SynthConfig(image_size=32, feature_grid=4)
    texts = [c for i in range(12) for c in synth.generate_sample(i, config)[2]["caption"]]  # type: ignore[union-attr]
    tokenizer = train_tiny_text_tokenizer(texts, cfg.model.vocab.text_vocab_size, root / "tok")
    model, vae = random_reference(cfg)
    return save_pretrained(model.eval(), vae.eval(), root / "hf", tokenizer_dir=tokenizer)


@pytest.fixture(scope="session")
def checkpoint_without_vae(checkpoint: Path) -> Path:
    """The same model exported without its VAE, as ``to-hf`` exports a run started from the seeded init."""
    model, _ = random_reference(tiny_config())
    return save_pretrained(model.eval(), None, checkpoint.parent / "hf_no_vae", tokenizer_dir=checkpoint)
