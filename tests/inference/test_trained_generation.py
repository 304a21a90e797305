"""Generation from a briefly trained tiny model (the slowest inference test, under ~90 s on a loaded CPU).

The tiny model trains in process on a handful of synthetic scenes (``datasets/synth.py``
shards, real loader, packing, step inputs and loss) with depth among the targets; then every
modality generates as a target, chained and best-of-N requests complete, and rgb -> depth of
the trained model is closer to the ground truth than the untrained model's. The ground truth
is compared in the space the model predicts: the generated latent tokens against the VAE
latents of the true depth map (the random, frozen VAE's decoder says little about them).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from modus_mega.config import ModusConfig, load_config
from modus_mega.data.loader import PackedLoader
from modus_mega.data.sources import ShardSource
from modus_mega.data.shard_format import SkipCounter
from modus_mega.datasets.synth import SynthConfig, write_dataset
from modus_mega.datasets.train_text import shard_texts
from modus_mega.data.documents import Sample
from modus_mega.encoders.vae import FluxAutoEncoder, patchify_latents
from modus_mega.inference.generator import Generator, Settings
from modus_mega.inference.verification import LikelihoodVerifier, best_of_n
from modus_mega.modalities import modality, modality_names
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.ops.attention_reference import ReferenceAttention
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.losses import modus_loss
from modus_mega.training.prepare import prepare_step_inputs
from tests.conftest import REPO

SIZE = 32  # pixels: 2 x 2 latent tokens per 2D split in the tiny model
TRAIN_SCENES, HELD_OUT = 8, 3
STEPS = 40
FAST = dict(steps=8, image_size=(SIZE, SIZE))


def _train(model: ModusModel, vae: FluxAutoEncoder, loader: PackedLoader, cfg: ModusConfig) -> None:
    """Plain AdamW steps of the training loss on the loader's micro-batches (one per step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.training.optim.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = iter(loader)
    for step in range(STEPS):
        inputs = prepare_step_inputs(next(batches), vae, cfg.model, torch.Generator().manual_seed(step))
        logits, velocity = model(inputs.model, inputs.targets.ce_index, inputs.targets.mse_index, ReferenceAttention())
        terms = modus_loss(logits, velocity, inputs.targets, *inputs.targets.counts)
        optimizer.zero_grad()
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def _depth_error(generator: Generator, samples: list[Sample], settings: Settings) -> float:
    """Mean squared error of rgb -> depth latents against the VAE latents of the true depth, over ``samples``."""
    errors = []
    for sample in samples:
        generated = generator.generate(sample, ["rgb"], ["depth"], settings).targets[0].latent  # [N, P]
        with torch.no_grad():
            truth = generator.vae.encode(sample.images["depth"][None], sample=False)[0]  # [C, h, w]
        errors.append(float(((generated - patchify_latents(truth, generator.model.cfg.latent_patch_size)) ** 2).mean()))
    return sum(errors) / len(errors)


def _scenes(directory: Path, count: int, seed: int) -> Path:
    write_dataset(directory, count, SynthConfig(image_size=SIZE, seed=seed, feature_grid=4), samples_per_shard=count, progress=False)
    return directory


def test_a_briefly_trained_model_generates_every_modality_and_learns_rgb_to_depth(tmp_path: Path) -> None:
    scenes = _scenes(tmp_path / "train", TRAIN_SCENES, seed=0)
    tokenizer = train_tiny_text_tokenizer(list(shard_texts(scenes, SkipCounter())), 512, tmp_path / "tok")
    cfg = load_config(REPO / "configs" / "tiny.json", [
        "data.source=shards", f"data.shards={scenes}", f"data.text_tokenizer={tokenizer}", f"data.image_size={SIZE}",
        "data.augment.crop_min_side=1.0", "data.augment.hflip=false", "data.token_budget=256", "data.condition_mode_2d=vae",
        "data.max_conditions=1", 'data.target_weights={"depth": 1.0, "rgb": 0.3, "caption": 0.3}', "training.optim.lr=0.01",
        # A trained VAE's latents have about unit variance; the random one's are scaled to match, and the mean is used
        # (its random posterior noise would otherwise swamp a few training steps).
        "model.vae.scale_factor=8.0", "model.vae.sample_posterior=false",
    ])  # fmt: skip
    model = ModusModel(cfg.model)
    init_weights(model, 0, cfg.model.llm.init_std, zero_init=("llm2vae",))
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, 0, cfg.model.llm.init_std, prefix="vae.")
    vae.requires_grad_(False).eval()
    vocab = model.vocab
    held_out_data = dataclasses.replace(cfg.data, shards=str(_scenes(tmp_path / "held_out", HELD_OUT, seed=1)))
    held_out = [s for _, s in ShardSource(held_out_data, vocab, size_multiple=16).samples(0, 0, 0)]
    assert len(held_out) == HELD_OUT and all("depth" in s.images and "caption" in s.tokens for s in held_out)
    settings = Settings(**FAST, seed=1)
    before = _depth_error(Generator(copy.deepcopy(model).eval(), vae, ReferenceAttention(), cfg.data), held_out, settings)

    _train(model.train(), vae, PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, vocab), cfg)

    quantizers = {
        name: FeatureQuantizer(name, torch.randn(2 if modality(name).kind == "feature_global" else 1, cfg.model.vocab.codebook_size, 8))
        for name in modality_names() if modality(name).kind.startswith("feature")
    }  # fmt: skip
    generator = Generator(model.eval(), vae, ReferenceAttention(), cfg.data, quantizers)
    after = _depth_error(generator, held_out, settings)
    assert after < before, f"rgb -> depth MSE on held-out scenes: trained {after:.4f}, untrained {before:.4f}"

    sample, quick = held_out[0], Settings(steps=2, image_size=(SIZE, SIZE), seed=2)
    others = [name for name in modality_names() if name != "rgb"]
    expression = generator.builder.vocab.text.start + 5  # any text id: grounding forces it as the expression
    every = generator.generate(sample, ["rgb"], others, quick, expressions={"grounding": [expression]}).targets
    every += generator.generate(sample, ["caption"], ["rgb"], quick).targets
    assert sorted(t.name for t in every) == sorted(modality_names())
    assert all((t.image is not None) != (t.ids is not None) for t in every)

    chained = generator.generate(sample, ["rgb"], ["depth", "normal"], Settings(**FAST, chain=True))
    assert [t.name for t in chained.targets] == ["depth", "normal"] and len(chained.document.vae_images) == 3

    verified = best_of_n(generator, sample, ["caption"], "rgb", quick, 2, LikelihoodVerifier(sample.tokens["caption"]))
    assert len(verified.scores) == 2 and all(s < 0 for s in verified.scores) and verified.best == verified.scores.index(max(verified.scores))
