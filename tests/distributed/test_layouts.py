"""Whole training runs (``training.loop.train``) at several layouts give the same curves.

One spawn of two gloo ranks trains the tiny model for a few steps at each two-rank layout
(the process group is reused; Megatron's groups are rebuilt per layout), one spawn of a
single rank trains the serial reference:

- ZeRO 1, 2, 3 against ZeRO 0, at dp = 2 (each dp rank reads its own half of the data);
- tp = 2 against the serial run: loss, CE, MSE and the gradient norm (which, unlike
  Adam's update, is sensitive to the scale of the summed gradient);
- dp = 2's first step against a hand-written serial step over both dp ranks' first
  micro-batches, normalised by the global target counts (checks the dp split of the data,
  the count all-reduce and that gradients are summed, not averaged, over dp).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from megatron.core import parallel_state

import torch

from modus_mega.config import config_from_dict, config_to_dict
from modus_mega.data.loader import PackedLoader
from modus_mega.parallel.build import build_model, build_vae
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.loop import micro_batch_generator, train
from modus_mega.training.prepare import prepare_step_inputs
from tests.distributed.helpers import run_distributed
from tests.model.helpers import micro_batch_loss

STEPS = 4
TWO_RANK_LAYOUTS = {
    "zero0": {"parallel.zero_stage": 0},
    "zero1": {"parallel.zero_stage": 1},
    "zero2": {"parallel.zero_stage": 2},
    "zero3": {"parallel.zero_stage": 3},
    "tp2": {"parallel.tp": 2},
}
SERIAL = {"serial": {}}


def _worker(raw: dict, layouts: dict[str, dict], out: str) -> None:
    for name, overrides in layouts.items():
        cfg = config_from_dict(copy.deepcopy(raw))
        for key, value in overrides.items():
            section, field = key.split(".")
            setattr(getattr(cfg, section), field, value)
        cfg.training.run_dir = str(Path(out) / name)
        ctx = ParallelContext.initialize(cfg.parallel)
        try:
            train(cfg, ctx)
        finally:
            parallel_state.destroy_model_parallel()  # the process group stays for the next layout
    ctx.close()


def _serial_worker(raw: dict, out: str) -> None:
    """The serial training run, and the first step of dp = 2 done by hand in one process."""
    _worker(raw, SERIAL, out)
    cfg = config_from_dict(copy.deepcopy(raw))
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        model, vae = build_model(cfg, ctx), build_vae(cfg, ctx)
        inputs = []
        for dp_rank in range(2):
            loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, model.vocab, dp_rank, 2)
            batch = next(iter(loader))
            inputs.append(prepare_step_inputs(batch, vae, cfg.model, micro_batch_generator(cfg.training.seed, 0, dp_rank, ctx.device)))
        num_ce = sum(i.targets.ce_index.numel() for i in inputs)
        num_mse = sum(i.targets.mse_index.numel() for i in inputs)
        loss = 0.0
        for i in inputs:
            terms = micro_batch_loss(model, i, global_counts=(num_ce, num_mse))
            terms.loss.backward()
            loss += terms.loss.item()
        grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
        (Path(out) / "dp_reference.json").write_text(json.dumps({"loss": loss, "grad_norm": grad_norm}))
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    cfg.training.steps = STEPS
    cfg.training.log_every = 1
    cfg.training.optim.warmup_steps = 0
    cfg.data.token_budget = 256
    out = tmp_path_factory.mktemp("layouts")
    run_distributed(_worker, 2, config_to_dict(cfg), TWO_RANK_LAYOUTS, str(out))
    run_distributed(_serial_worker, 1, config_to_dict(cfg), str(out))
    result = {"dp_reference": [json.loads((out / "dp_reference.json").read_text())]}
    for name in [*TWO_RANK_LAYOUTS, *SERIAL]:
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(STEPS)), name
        result[name] = records
    return result


def _series(runs: dict[str, list[dict]], name: str, key: str) -> list[float]:
    return [r[key] for r in runs[name]]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_no_zero(runs: dict[str, list[dict]], stage: int) -> None:
    assert _series(runs, f"zero{stage}", "loss") == pytest.approx(_series(runs, "zero0", "loss"), rel=1e-5)
    assert _series(runs, f"zero{stage}", "grad_norm") == pytest.approx(_series(runs, "zero0", "grad_norm"), rel=1e-4)


def test_tensor_parallel_matches_serial(runs: dict[str, list[dict]]) -> None:
    for key in ("loss", "ce", "mse", "grad_norm"):
        assert _series(runs, "tp2", key) == pytest.approx(_series(runs, "serial", key), rel=1e-4), key


def test_data_parallel_step_matches_serial_step_over_both_ranks_data(runs: dict[str, list[dict]]) -> None:
    reference, first = runs["dp_reference"][0], runs["zero0"][0]
    assert first["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert first["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def test_training_moves_the_loss(runs: dict[str, list[dict]]) -> None:
    assert runs["zero0"][-1]["loss"] < runs["zero0"][0]["loss"]
