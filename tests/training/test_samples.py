"""Samples during training (``training.sample_every``): a 3-step tiny run writes its contact sheet when due."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from modus_mega.config import ModusConfig, load_config, validate
from modus_mega.convert.__main__ import main as convert
from modus_mega.convert.hf import VQ_DIR
from modus_mega.generate.__main__ import CONTACT_SHEET, main
from modus_mega.data.procedural import procedural_sample
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.loop import train
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.training.samples import NUM_SCENES, SAMPLES_DIR, TrainingSampler, held_out_requests


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step tiny run (with an EMA and a codebook) sampling every 2 steps."""
    from tests.conftest import _TINY

    path = tmp_path_factory.mktemp("samples_run")
    vq_dir = tmp_path_factory.mktemp("vq")
    codebook = torch.randn(2, _TINY.model.vocab.codebook_size, 8, generator=torch.Generator().manual_seed(0))
    FeatureQuantizer("clip_global", codebook).save(vq_dir / "clip_global.safetensors")
    cfg = copy.deepcopy(_TINY)
    cfg.data.vq_dir = str(vq_dir)  # unused by procedural data; to-hf copies it along
    cfg.training.steps, cfg.training.sample_every, cfg.training.ema_decay = 3, 2, 0.9
    cfg.training.run_dir, cfg.training.wandb_mode = str(path), "disabled"
    cfg.data.token_budget, cfg.data.image_size = 256, 32
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        train(cfg, ctx)
    finally:
        ctx.close()
    return path


def test_a_tiny_run_writes_its_samples_when_due(run_dir: Path) -> None:
    written = sorted(p.name for p in (run_dir / SAMPLES_DIR).glob("*.png"))
    assert written == ["step_00000002.png"]
    sheet = Image.open(run_dir / SAMPLES_DIR / written[0])
    assert sheet.size[1] > NUM_SCENES * 160  # one row per held-out scene


def test_generate_reads_the_run_and_draws_its_held_out_scenes(run_dir: Path, tmp_path: Path) -> None:
    """``python -m modus_mega.generate --held-out --ema`` on the run directory (seeded VAE, EMA weights)."""
    main(["--ckpt", str(run_dir), "--ema", "--held-out", "--steps", "2", "--quiet", "--out", str(tmp_path)])
    requests = held_out_requests(load_config(run_dir / "config.json"))
    for request in requests:
        assert Image.open(tmp_path / request.conditions.key / "rgb.png").size == (32, 32)
    assert Image.open(tmp_path / CONTACT_SHEET).size[1] > NUM_SCENES * 160


def test_held_out_scenes_are_not_training_scenes(tiny_config: ModusConfig) -> None:
    requests = held_out_requests(tiny_config)
    assert [r.order for r in requests] == [["caption"]] * NUM_SCENES  # tiny trains caption and rgb: caption -> rgb
    training = [procedural_sample(i, tiny_config.data.image_size, tiny_config.data.seed) for i in range(64)]
    for request in requests:
        assert request.truth is request.conditions
        assert not any(torch.equal(request.conditions.images["rgb"], s.images["rgb"]) for s in training)


def test_a_shards_run_samples_synthetic_scenes_of_its_2d_targets(tiny_config: ModusConfig) -> None:
    tiny_config.data.source, tiny_config.data.image_size = "shards", 32
    tiny_config.data.target_weights = {"caption": 1.0, "normal": 1.0, "canny": 0.0, "depth": 2.0, "seg": 1.0}
    requests = held_out_requests(tiny_config)
    assert len(requests) == NUM_SCENES
    for request in requests:
        assert request.order == ["rgb"] and request.targets == ["depth", "normal"]  # table order, first two trained
        assert request.truth.images["depth"].shape == (3, 32, 32)


def test_a_negative_sample_every_is_refused(tiny_config: ModusConfig) -> None:
    tiny_config.training.sample_every = -1
    with pytest.raises(ValueError, match="training.sample_every"):
        validate(tiny_config)


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {"zero_stage": 3}])
def test_samples_need_the_whole_model_on_rank_0(
    tiny_config: ModusConfig, layout: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    tiny_config.training.sample_every = 1
    for key, value in layout.items():
        setattr(tiny_config.parallel, key, value)
    sampler = TrainingSampler(tiny_config, SimpleNamespace(is_main=True))  # type: ignore[arg-type]
    assert sampler.requests == [] and "samples need tp = pp = 1 and ZeRO <= 2" in caplog.text
    assert sampler.after_step(1, None, None) is None  # type: ignore[arg-type]


def test_to_hf_carries_the_codebooks_that_feature_targets_need(run_dir: Path, tmp_path: Path) -> None:
    """``convert to-hf`` of the run copies ``data.vq_dir`` into ``vq/``; ``generate`` then decodes a feature target."""
    convert(["to-hf", str(run_dir), str(tmp_path / "hf"), "--quiet"])
    assert (tmp_path / "hf" / VQ_DIR / "clip_global.safetensors").is_file()
    main(["--ckpt", str(tmp_path / "hf"), "--target", "clip_global", "--quiet", "--out", str(tmp_path / "out")])
    assert np.load(tmp_path / "out" / "clip_global.npy").shape == (8,)
