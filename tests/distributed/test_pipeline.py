"""Pipeline parallel (DeepSpeed ``PipelineModule``, gloo CPU ranks) against runs without it.

Whole training runs (``training.loop.train``) of the tiny model, a few steps of two
micro-batches each (so DeepSpeed's pipeline schedule interleaves them), with both 1D (CE)
and 2D (MSE) targets and a non-zero ``llm2vae`` so 2D gradients reach every stage:

- this process, one rank: the serial reference;
- two ranks: pp = 2 with ZeRO 0 (our clipping) and with ZeRO 1 (DeepSpeed's) plus full
  recomputation; the ZeRO 0 run's step-2 checkpoint resumed in a fresh run directory; the
  dp = 2 reference for the four-rank run; each stage's weights right after initialisation;
- four ranks: tp = 2 x pp = 2 (ZeRO 1) against the serial run, dp = 2 x pp = 2 against dp = 2
  (the dp split of the data and the loss scale over dp).

Loss, CE, MSE, per-modality losses and gradient norms must match (the norm, unlike Adam's
update, sees the scale of the summed gradient); the stages' initial weights, put together
under their global names, must equal the serial model's.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modus_mega.config import config_from_dict, config_to_dict
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.build import build_model
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.pipeline import global_parameter_name
from modus_mega.training.loop import train
from tests.distributed.helpers import config_with, run_distributed, run_in_layout

STEPS = 4
RESUME_AT = 2
PP2 = {"parallel.pp": 2}
PP2_ZERO1 = {"parallel.pp": 2, "parallel.zero_stage": 1, "parallel.recompute": "full"}
TP2_PP2 = {"parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1}


def _train(raw: dict, overrides: dict, run_dir: Path) -> None:
    run_in_layout(raw, overrides, run_dir, train)


def _two_rank_worker(raw: dict, out: str) -> None:
    root = Path(out)
    _train(raw, PP2, root / "pp2")
    _train(raw, PP2_ZERO1, root / "pp2_zero1")
    _train(raw, {}, root / "dp2")

    # Resume: the pp2 run's step-2 checkpoint, continued to the end in a fresh run directory.
    resumed = root / "pp2_resumed" / "checkpoints"
    tag = f"step_{RESUME_AT:08d}"
    if dist.get_rank() == 0:
        shutil.copytree(root / "pp2" / "checkpoints" / tag, resumed / tag)
        (resumed / "latest").write_text(tag)
    dist.barrier()
    _train(raw, PP2, root / "pp2_resumed")

    # The stages' weights right after initialisation, under their global names.
    cfg = config_with(raw, PP2, root / "init")
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        pipeline = build_model(cfg, ctx)
        weights = {global_parameter_name(n): p.detach().clone() for n, p in pipeline.named_parameters()}
        torch.save(weights, root / f"init_stage{ctx.pp_rank}.pt")
    finally:
        ctx.close()


def _four_rank_worker(raw: dict, out: str) -> None:
    _train(raw, TP2_PP2, Path(out) / "tp2_pp2")
    _train(raw, PP2, Path(out) / "dp2_pp2")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def raw_config() -> dict:
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    cfg.training.steps = STEPS
    cfg.training.grad_accum_steps = 2
    cfg.training.checkpoint_every = RESUME_AT
    cfg.training.log_every = 1
    cfg.training.optim.warmup_steps = 0
    cfg.data.token_budget = 256
    cfg.model.zero_init_llm2vae = False  # a zero head would hide the 2D gradient path behind it
    cfg.training.wandb_mode = "disabled"
    return config_to_dict(cfg)


@pytest.fixture(scope="module")
def runs(raw_config: dict, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline")
    try:
        _train(raw_config, {}, out / "serial")  # one rank, in this process
    finally:
        dist.destroy_process_group()
    run_distributed(_two_rank_worker, 2, raw_config, str(out))
    return out


def _records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def _series(out: Path, name: str, key: str) -> list[float]:
    return [r[key] for r in _records(out, name)]


def test_serial_run_has_both_kinds_of_targets(runs: Path) -> None:
    records = _records(runs, "serial")
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(r["ce"] > 0 and r["mse"] > 0 for r in records)
    assert any(k.startswith("loss/") for k in records[0])


@pytest.mark.parametrize("name", ["pp2", "pp2_zero1"])
def test_pipeline_matches_serial(runs: Path, name: str) -> None:
    assert [r["step"] for r in _records(runs, name)] == list(range(STEPS))
    for key in ("loss", "ce", "mse", "grad_norm"):
        assert _series(runs, name, key) == pytest.approx(_series(runs, "serial", key), rel=1e-4), key
    serial, pipeline = _records(runs, "serial")[-1], _records(runs, name)[-1]
    modality_keys = sorted(k for k in serial if k.startswith("loss/"))
    assert modality_keys == sorted(k for k in pipeline if k.startswith("loss/"))
    assert [pipeline[k] for k in modality_keys] == pytest.approx([serial[k] for k in modality_keys], rel=1e-4)


def test_pipeline_resume_continues_the_run(runs: Path) -> None:
    straight, resumed = _records(runs, "pp2"), _records(runs, "pp2_resumed")
    assert [r["step"] for r in resumed] == list(range(RESUME_AT, STEPS))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[RESUME_AT:]], key


def test_init_is_pipeline_invariant(runs: Path, raw_config: dict) -> None:
    cfg = config_from_dict(copy.deepcopy(raw_config))
    serial = ModusModel(cfg.model)
    init_weights(serial, cfg.training.seed, cfg.model.llm.init_std)
    stages = [torch.load(runs / f"init_stage{s}.pt", weights_only=True) for s in range(2)]
    assert not stages[0].keys() & stages[1].keys(), "a parameter lives on two stages"
    assert "embed_tokens.weight" in stages[0] and "lm_head.weight" in stages[1]
    assert {n.split(".")[1] for n in stages[0] if n.startswith("layers.")} == {"0"}  # tiny: 2 layers, 1 per stage
    assert {n.split(".")[1] for n in stages[1] if n.startswith("layers.")} == {"1"}
    combined = stages[0] | stages[1]
    expected = dict(serial.named_parameters())
    assert combined.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(combined[name], weight.detach()), name


def test_four_ranks_tensor_and_data_parallel_with_pipeline(runs: Path, raw_config: dict) -> None:
    run_distributed(_four_rank_worker, 4, raw_config, str(runs))
    for name, reference in (("tp2_pp2", "serial"), ("dp2_pp2", "dp2")):
        assert [r["step"] for r in _records(runs, name)] == list(range(STEPS)), name
        for key in ("loss", "ce", "mse", "grad_norm"):
            assert _series(runs, name, key) == pytest.approx(_series(runs, reference, key), rel=1e-4), (name, key)
