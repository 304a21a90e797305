"""Documents built on BAGEL's own layouts follow BAGEL's conventions (DESIGN §1), checked against hand-written rows.

Layouts: text alone; text then a noisy VAE image; a clean VAE + ViT image then text; two
samples packed together. The rules: every image split is <vision_start> tokens
<vision_end> with the markers on the 1D expert; a split shares one position id; a clean
split advances the counter, a noisy one does not; positions restart per sample; clean
VAE tokens carry t = 0; a noise split is invisible outside itself.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from modus_mega.data.documents import IGNORE_LABEL, Document, DocumentBuilder, Sample, TokenGeometry
from modus_mega.data.packing import Packer
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT, expert_ids_of
from modus_mega.vocab import build_vocabulary
from tests.convert.helpers import tiny_config

T, VIT, VAE = TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE
CAPTION = [5, 6, 7]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    cfg.data.condition_mode_2d, cfg.data.max_conditions, cfg.data.condition_dropout = "both", 1, 0.0
    vocab = build_vocabulary(cfg.model.vocab)
    sample = Sample(key="s", images={"rgb": torch.rand(3, 32, 32) * 2 - 1}, tokens={"caption": CAPTION})
    return cfg, vocab, sample  # 32 px: 2x2 VAE tokens (16 px cells), 4x4 ViT patches (8 px)


def build(cfg, vocab, sample: Sample, target: str, want: Callable[[Document], bool]) -> Document:
    """The first document (over seeds) with ``target`` as target that satisfies ``want``."""
    cfg.data.target_weights = {target: 1.0}
    builder = DocumentBuilder(cfg.data, cfg.training.timesteps, cfg.model, vocab)
    for seed in range(64):
        doc = builder.build(sample, torch.Generator().manual_seed(seed))
        if doc is not None and want(doc):
            return doc
    raise AssertionError(f"no seed gave the wanted {target} layout")


def test_text_alone(setup) -> None:
    cfg, vocab, sample = setup
    doc = build(cfg, vocab, sample, "caption", lambda d: not d.vae_images and not d.vit_images)
    eos, start = vocab.end_of_segment_id, vocab.start_marker("caption")
    assert doc.input_ids == [start, *CAPTION, eos]
    assert doc.position_ids == [0, 1, 2, 3, 4]
    assert doc.token_type == [T] * 5
    assert doc.ce_labels == [5, 6, 7, eos, IGNORE_LABEL]


def test_text_then_noisy_image(setup) -> None:
    cfg, vocab, sample = setup
    doc = build(cfg, vocab, sample, "rgb", lambda d: len(d.input_ids) == 11)
    vs, ve = vocab.vision_start_id, vocab.vision_end_id
    assert doc.input_ids == [vocab.start_marker("caption"), *CAPTION, vocab.start_marker("rgb"), vs, 0, 0, 0, 0, ve]
    assert doc.token_type == [T, T, T, T, T, T, VAE, VAE, VAE, VAE, T]
    assert doc.position_ids == [0, 1, 2, 3, 4] + [5] * 6
    assert doc.next_position == 5  # a noisy image does not advance: its clean copy or the next text reuses 5
    assert doc.layout == [("causal", 5), ("noise", 6)]
    assert len(doc.vae_timesteps) == 1 and 0.0 < doc.vae_timesteps[0] <= 1.0
    experts = expert_ids_of(torch.tensor(doc.token_type)).tolist()
    assert experts == [0] * 6 + [1] * 4 + [0]  # markers on the 1D expert, latent tokens on the 2D expert


def test_clean_vae_and_vit_image_then_text(setup) -> None:
    cfg, vocab, sample = setup
    doc = build(cfg, vocab, sample, "caption", lambda d: bool(d.vae_images))
    vs, ve, eos = vocab.vision_start_id, vocab.vision_end_id, vocab.end_of_segment_id
    vae_split, vit_split = [vs, *[0] * 4, ve], [vs, *[0] * 16, ve]
    caption = [vocab.start_marker("caption"), *CAPTION, eos]
    assert doc.input_ids == [vocab.start_marker("rgb"), *vae_split, *vit_split, *caption]
    assert doc.token_type == [T] + [T, *[VAE] * 4, T] + [T, *[VIT] * 16, T] + [T] * 5
    assert doc.position_ids == [0] + [1] * 6 + [2] * 18 + [3, 4, 5, 6, 7]
    assert doc.layout == [("causal", 1), ("full", 6), ("full", 18), ("causal", 5)]
    assert doc.vae_timesteps == [0.0]  # clean VAE tokens: the timestep embedding of t = 0


def test_two_packed_samples_restart_positions_and_hide_the_noise_split(setup) -> None:
    cfg, vocab, sample = setup
    first = build(cfg, vocab, sample, "rgb", lambda d: len(d.input_ids) == 11)  # text, then noisy image
    second = build(cfg, vocab, sample, "caption", lambda d: bool(d.vae_images))  # clean image, then text
    g = TokenGeometry.of(cfg.model)
    batch = Packer(64, g.vit_patch, g.vit_max_side, g.vae_cell, cfg.model.max_latent_size).collate([first, second])
    n1, n2 = len(first), len(second)
    assert batch.model.position_ids[: n1 + n2].tolist() == first.position_ids + second.position_ids
    assert batch.model.position_ids[n1] == 0
    assert batch.model.vae_timesteps[:4].gt(0).all() and batch.model.vae_timesteps[4:].eq(0).all()
    noise = range(5, 11)  # the noisy split of the first sample, markers included
    assert batch.model.attn_lo[noise].eq(5).all() and batch.model.attn_hi[noise].eq(11).all()
    assert batch.model.attn_hi[:5].eq(n1).all()  # the first sample's text is seen to the end of its sample only
