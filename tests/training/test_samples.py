"""Samples during training (``training.sample_every``): a 3-step tiny run writes its contact sheet when due."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from modus_mega.config import ModusConfig, validate
from modus_mega.data.procedural import procedural_sample
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.loop import train
from modus_mega.training.samples import NUM_SCENES, SAMPLES_DIR, held_out_requests


def test_a_tiny_run_writes_its_samples_when_due(tiny_config: ModusConfig, tmp_path: Path) -> None:
    cfg = copy.deepcopy(tiny_config)
    cfg.training.steps, cfg.training.sample_every, cfg.training.ema_decay = 3, 2, 0.9
    cfg.training.run_dir, cfg.training.wandb_mode = str(tmp_path), "disabled"
    cfg.data.token_budget, cfg.data.image_size = 256, 32
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        train(cfg, ctx)
    finally:
        ctx.close()
    written = sorted(p.name for p in (tmp_path / SAMPLES_DIR).glob("*.png"))
    assert written == ["step_00000002.png"]
    sheet = Image.open(tmp_path / SAMPLES_DIR / written[0])
    assert sheet.size[1] > NUM_SCENES * 160  # one row per held-out scene


def test_held_out_scenes_are_not_training_scenes(tiny_config: ModusConfig) -> None:
    requests = held_out_requests(tiny_config)
    assert [r.order for r in requests] == [["caption"]] * NUM_SCENES  # tiny trains caption and rgb: caption -> rgb
    training = [procedural_sample(i, tiny_config.data.image_size, tiny_config.data.seed) for i in range(64)]
    for request in requests:
        assert request.truth is request.conditions
        assert not any(torch.equal(request.conditions.images["rgb"], s.images["rgb"]) for s in training)


def test_a_negative_sample_every_is_refused(tiny_config: ModusConfig) -> None:
    tiny_config.training.sample_every = -1
    with pytest.raises(ValueError, match="training.sample_every"):
        validate(tiny_config)
