"""Build real mixed micro-batches (text, ViT and VAE tokens) for model tests, and their loss."""

from __future__ import annotations

import torch

from modus_mega.config import ModusConfig
from modus_mega.data.documents import DocumentBuilder, TokenGeometry
from modus_mega.data.packing import PackedBatch, Packer
from modus_mega.data.procedural import procedural_sample
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.losses import CrossEntropyFn, LossBreakdown, modus_loss, serial_cross_entropy
from modus_mega.model.init import init_weights
from modus_mega.model.inputs import StepInputs
from modus_mega.training.prepare import prepare_step_inputs


def packed_batch(cfg: ModusConfig, vocab, num_samples: int = 4, seed: int = 0) -> PackedBatch:
    """One micro-batch of procedural documents with every condition mode present."""
    cfg.data.condition_mode_2d = "both"
    cfg.data.max_conditions = 2
    builder = DocumentBuilder(cfg.data, cfg.training.timesteps, cfg.model, vocab)
    g = TokenGeometry.of(cfg.model)
    budget = cfg.data.token_budget * num_samples
    packer = Packer(budget, g.vit_patch, g.vit_max_side, g.vae_cell, cfg.model.max_latent_size)
    docs = [
        builder.build(procedural_sample(i, cfg.data.image_size, seed), torch.Generator().manual_seed(seed + i))
        for i in range(num_samples)
    ]
    return packer.collate([d for d in docs if d is not None])


def step_inputs(cfg: ModusConfig, vocab, num_samples: int = 4, seed: int = 0) -> StepInputs:
    """Prepared model inputs (VAE-encoded and noised) for ``packed_batch``."""
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, seed=seed, std=0.02)
    batch = packed_batch(cfg, vocab, num_samples, seed)
    return prepare_step_inputs(batch, vae, cfg.model, torch.Generator().manual_seed(seed))


def micro_batch_loss(
    model, step: StepInputs, cross_entropy: CrossEntropyFn = serial_cross_entropy, global_counts: tuple[int, int] | None = None
) -> LossBreakdown:
    """``model``'s forward on one prepared micro-batch and its ``modus_loss``, as the eager training step
    computes them; normalised by ``global_counts`` (default: this micro-batch's own target counts)."""
    logits, velocity = model(step.model, step.targets.ce_index, step.targets.mse_index)
    counts = global_counts or step.targets.counts
    return modus_loss(logits, velocity, step.targets, *counts, cross_entropy=cross_entropy)
