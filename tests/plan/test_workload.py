"""The workload model against the mask oracle, fit_image and the real document builder."""

from __future__ import annotations

import math
import random

import pytest
import torch

from modus_mega.config import ModusConfig
from modus_mega.data.documents import IGNORE_LABEL, DocumentBuilder, Sample, fit_image
from modus_mega.modalities import MODALITIES
from modus_mega.model.inputs import TOKEN_VIT
from modus_mega.ops.mask import dense_mask_from_layout, lo_hi_for_layout
from modus_mega.plan.workload import document_mix, fitted_grid, micro_batch, visible_pairs
from modus_mega.vocab import build_vocabulary

TOKENS_1D = 16


def test_visible_pairs_equal_the_mask() -> None:
    rng = random.Random(0)
    for _ in range(40):
        runs = [(rng.choice(["causal", "full", "noise"]), rng.randint(1, 9)) for _ in range(rng.randint(1, 6))]
        lo, hi = lo_hi_for_layout([runs])
        assert visible_pairs(runs) == int((hi - lo).sum()) == int(dense_mask_from_layout([runs]).sum())


@pytest.mark.parametrize(("side", "cell", "max_cells"), [(64, 16, 64), (512, 14, 70), (512, 16, 64), (1000, 14, 70), (100, 8, 8)])
def test_fitted_grid_matches_fit_image(side: int, cell: int, max_cells: int) -> None:
    fitted = fit_image(torch.zeros(3, side, side), cell, max_cells)
    assert fitted.shape[1] == fitted.shape[2] == fitted_grid(side, cell, max_cells) * cell


def test_document_mix_matches_the_document_builder(tiny_config: ModusConfig) -> None:
    """Moments of the enumeration against 4000 documents of the real builder (within 5 standard errors)."""
    data = tiny_config.data
    data.target_weights = {"caption": 1.0, "rgb": 3.0, "depth": 1.0, "dinov2_global": 1.0}
    data.condition_dropout = 0.2
    vocab = build_vocabulary(tiny_config.model.vocab)
    builder = DocumentBuilder(data, tiny_config.training.timesteps, tiny_config.model, vocab)
    side = data.image_size
    sample = Sample(
        key="all-15",
        images={m.name: torch.zeros(3, side, side) for m in MODALITIES if m.family == "2d"},
        tokens={m.name: [7] * TOKENS_1D for m in MODALITIES if m.family == "1d"},
    )
    generator = torch.Generator().manual_seed(0)
    stats: dict[str, list[float]] = {"tokens": [], "pairs": [], "vit": [], "vae_images": [], "ce": []}
    longest = 0
    for _ in range(4000):
        doc = builder.build(sample, generator)
        longest = max(longest, len(doc))
        stats["tokens"].append(len(doc))
        stats["pairs"].append(visible_pairs(doc.layout))
        stats["vit"].append(sum(t == TOKEN_VIT for t in doc.token_type))
        stats["vae_images"].append(len(doc.vae_images))
        stats["ce"].append(sum(label != IGNORE_LABEL for label in doc.ce_labels))

    mix = document_mix(tiny_config, TOKENS_1D)
    expected = {
        "tokens": mix.mean_tokens, "pairs": mix.mean_pairs, "vit": mix.mean_vit_tokens,
        "vae_images": mix.mean_vae_images, "ce": mix.mean_ce_tokens,
    }  # fmt: skip
    for name, values in stats.items():
        mean = sum(values) / len(values)
        sem = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
        assert abs(mean - expected[name]) <= 5 * sem + 1e-9, (name, mean, expected[name], sem)
    # Longest: max_conditions 2D conditions (marker + VAE split + ViT split) and a 2D target (marker + noisy split).
    vae, vit = (side // 16) ** 2, (side // 8) ** 2
    assert mix.max_tokens == data.max_conditions * (1 + vae + 2 + vit + 2) + 1 + vae + 2
    assert longest <= mix.max_tokens


def test_micro_batch_rejects_budgets_below_the_longest_document(tiny_config: ModusConfig) -> None:
    mix = document_mix(tiny_config, TOKENS_1D)
    with pytest.raises(ValueError, match="longest document"):
        micro_batch(mix, mix.max_tokens - 1)
    mb = micro_batch(mix, 4 * mix.max_tokens)
    assert 0 < mb.packing_efficiency < 1 and mb.real_tokens < mb.tokens
    assert mb.peak_vit_tokens >= mb.vit_tokens and mb.peak_ce_tokens >= mb.ce_tokens
    assert mb.peak_vae_images >= mb.vae_images
