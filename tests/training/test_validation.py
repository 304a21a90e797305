"""The validation loss (``training/validation.py``): the training objective on held-out shards.

- In one process: evaluating the held-out micro-batches gives exactly the loss sums that a
  training step on the same micro-batches reports (computed before its update), changes no
  weight, tells the non-finite guard nothing, and gives the same sums when repeated.
- Whole runs at lr 1e-12 (the weights barely move, so every validation scores the same model
  to far below the comparison's tolerance; 0 is not a valid learning rate):
  dp = 2 and pp = 2 (at dp = 1) log the same ``val/...`` records, at steps eval_every, 2 *
  eval_every, ... and at the end; the loss-curve PNG is written.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.datasets.synth import SynthConfig, write_dataset
from modus_mega.datasets.train_text import main as train_text
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.engine import build_engine
from modus_mega.training.loop import _truncate_log, train
from modus_mega.training.metrics import read_jsonl
from modus_mega.training.validation import Validation
from modus_mega.vocab import build_vocabulary
from tests.distributed.helpers import run_distributed

STEPS, EVAL_EVERY = 4, 3  # validations after steps 3 and 4 (the end)
NUM_VAL_SHARDS = 4


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """A held-out synthetic split of 4 shards of 2 samples, and a text tokenizer trained on it."""
    root = tmp_path_factory.mktemp("held_out")
    synth = SynthConfig(image_size=64, feature_grid=4, feature_dim=16, split="val")
    write_dataset(root / "val", 2 * NUM_VAL_SHARDS, synth, samples_per_shard=2, progress=False)
    train_text(["--shards", str(root / "val"), "--out", str(root / "text"), "--vocab-size", "400"])
    return root


def _configure(cfg: ModusConfig, held_out: Path, run_dir: Path) -> ModusConfig:
    cfg = copy.deepcopy(cfg)
    cfg.data.val_shards = str(held_out / "val")
    cfg.data.text_tokenizer = str(held_out / "text")
    cfg.data.token_budget = 256
    cfg.model.zero_init_llm2vae = False  # a velocity head that reads its input: the MSE depends on the weights
    cfg.training.steps, cfg.training.eval_every, cfg.training.eval_batches = STEPS, EVAL_EVERY, 1
    cfg.training.log_every, cfg.training.checkpoint_every = 1, 0
    cfg.training.wandb_mode = "disabled"
    cfg.training.run_dir = str(run_dir)
    return cfg


def test_validation_is_the_training_loss_without_the_update(tiny_config: ModusConfig, held_out: Path, tmp_path: Path) -> None:
    cfg = _configure(tiny_config, held_out, tmp_path)
    cfg.training.grad_accum_steps = NUM_VAL_SHARDS  # one optimizer step over all the held-out micro-batches
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        engine = build_engine(cfg, ctx)
        validation = Validation(cfg, ctx, build_vocabulary(cfg.model.vocab))
        micro = validation.micro_batches(engine)
        assert len(micro) == NUM_VAL_SHARDS * cfg.training.eval_batches
        counts = (sum(m.targets.ce_index.numel() for m in micro), sum(m.targets.mse_index.numel() for m in micro))
        assert min(counts) > 0  # both terms are exercised
        before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}

        evaluated = engine.evaluate(micro, counts)
        assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
        with_mse = next(m for m in micro if m.targets.mse_index.numel())
        nan_targets = torch.full_like(with_mse.targets.velocity_target, float("nan"))
        poisoned = replace(with_mse, targets=replace(with_mse.targets, velocity_target=nan_targets))
        assert engine.evaluate([poisoned], counts)[0].isnan()
        assert engine.gate.end_step().ok  # a non-finite validation loss is no verdict on a training step
        again = engine.evaluate(validation.micro_batches(engine), counts)  # rebuilt readers, same noise
        assert torch.equal(again, evaluated)

        trained = engine.train_step(micro, counts)  # one update, after the loss of every micro-batch
        assert torch.equal(trained, evaluated)
        assert not all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
        after = engine.evaluate(micro, counts)
        assert after[0] != evaluated[0]
    finally:
        ctx.close()


def test_a_resumed_log_keeps_the_validation_of_its_checkpoint_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 1.0}, {"step": 2, "val/loss": 2.0}, {"step": 2, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _truncate_log(path, keep_below_step=2)
    assert read_jsonl(path) == records[:3]


# Two ranks: dp = 2 (eager, each rank two of the four readers) and pp = 2 at dp = 1 (eval_batch, all four).
LAYOUTS = {"dp2": {}, "pp2": {"pp": 2, "zero_stage": 1}}


def _runs(raw: dict, layouts: dict[str, dict], out: str) -> None:
    for name, overrides in layouts.items():
        cfg = config_from_dict(copy.deepcopy(raw))
        for key, value in overrides.items():
            setattr(cfg.parallel, key, value)
        cfg.training.run_dir = str(Path(out) / name)
        ctx = ParallelContext.initialize(cfg.parallel)
        try:
            train(cfg, ctx)
        finally:
            parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    ctx.close()


def test_validation_is_the_same_at_every_layout_and_logged_at_its_steps(
    tiny_config: ModusConfig, held_out: Path, tmp_path: Path
) -> None:
    cfg = _configure(tiny_config, held_out, tmp_path)
    cfg.training.optim.lr = cfg.training.optim.min_lr = 1e-12  # the weights barely move
    raw = config_to_dict(cfg)
    run_distributed(_runs, 2, raw, LAYOUTS, str(tmp_path))

    val = {}
    for name in LAYOUTS:
        records = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert [r["step"] for r in records if "loss" in r] == list(range(STEPS)), name
        val[name] = [r for r in records if "val/loss" in r]
        assert [r["step"] for r in val[name]] == [EVAL_EVERY, STEPS], name
        assert (tmp_path / name / "loss_curves.png").stat().st_size > 0
    reference = val["dp2"][0]
    assert {"val/loss", "val/ce", "val/mse", "val/loss/rgb", "val/loss/caption"} <= reference.keys()
    assert reference["val/loss"] == pytest.approx(reference["val/ce"] + reference["val/mse"], rel=1e-6)  # fp32 terms
    for name, records in val.items():
        for record in records:
            assert record.keys() == reference.keys(), name
            for key in reference.keys() - {"step"}:
                assert record[key] == pytest.approx(reference[key], rel=1e-5), (name, key)
