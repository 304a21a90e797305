"""Sequence parallelism (``parallel.sequence_parallel``, gloo CPU ranks) against the serial model.

- One spawn of two ranks builds, in each rank, the serial model and three tp = 2 twins from
  the same seed: sequence parallel, sequence parallel with full recomputation (the gathered
  copies freed after the forward are rebuilt inside recomputed layers too), and plain
  tensor parallel. All carry a non-zero ``o_proj`` bias, which tp rank 0 alone adds and
  whose gradient is summed over tp. One micro-batch with both 1D (CE) and 2D (MSE) targets
  and a packed length (237) that is not a multiple of tp runs through each; losses and the
  full (gathered) gradients must match the serial model's.
- Whole training runs (``training.loop.train``) of a few steps of two micro-batches each, at
  a token budget of 255 (padded to 256 inside the model): tp = 2 with ZeRO 2 (two ranks) and
  tp = 2 x pp = 2 with ZeRO 1 (four ranks: each stage sends its tp ranks' own rows), both
  sequence parallel, against the serial run: loss, CE, MSE and gradient norm per step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from modus_mega.config import ModusConfig, ParallelConfig, config_from_dict, config_to_dict
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.recompute import apply_activation_checkpointing
from modus_mega.parallel.tensor_parallel import (
    apply_tensor_parallel,
    build_linears,
    cross_entropy_fn,
    gather_tensor_parallel,
    init_hooks,
)
from modus_mega.training.loop import train
from tests.distributed.helpers import run_distributed, run_in_layout
from tests.model.helpers import micro_batch_loss, step_inputs

TP = 2
TWINS = ("sequence_parallel", "sequence_parallel_recompute", "tensor_parallel")
NUM_SAMPLES, TOKEN_BUDGET = 3, 79  # one packed micro-batch of 3 * 79 = 237 tokens
STEPS = 2
RUNS = {
    "tp2_sp_zero2": {"parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.zero_stage": 2},
    "tp2_sp_pp2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True, "parallel.zero_stage": 1},
}


# ----------------------------------------------------------------------------- one micro-batch


def _set_o_bias(model: ModusModel) -> None:
    """Give every o_proj bias the same non-zero values in every model (init makes biases zero)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("o_proj.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _twin(cfg: ModusConfig, ctx: ParallelContext, name: str) -> ModusModel:
    """The tp = 2 model of ``name`` (one of TWINS), built, hooked and initialised as the engine does."""
    ctx = dataclasses.replace(ctx, sequence_parallel=name != "tensor_parallel")
    model = ModusModel(cfg.model, build_linears(ctx, cfg.model.llm))
    apply_tensor_parallel(model, ctx)
    init_weights(model, seed=3, std=0.02, **init_hooks(ctx))
    _set_o_bias(model)
    if name == "sequence_parallel_recompute":
        apply_activation_checkpointing(model, ParallelConfig(recompute="full"))
    return model


def _model_worker(raw: dict, out: str) -> None:
    cfg = config_from_dict(raw)
    cfg.model.attention_backend = "reference"
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        serial = ModusModel(cfg.model)
        init_weights(serial, seed=3, std=0.02)
        _set_o_bias(serial)
        inputs = step_inputs(copy.deepcopy(cfg), serial.vocab, num_samples=NUM_SAMPLES, seed=0)
        loss = micro_batch_loss(serial, inputs).loss
        loss.backward()
        result = {
            "num_tokens": inputs.model.token_type.numel(),
            "num_ce": inputs.targets.ce_index.numel(),
            "num_mse": inputs.targets.mse_index.numel(),
            "serial": (loss.item(), {n: p.grad.clone() for n, p in serial.named_parameters() if p.grad is not None}),
        }
        for name in TWINS:
            model = _twin(cfg, ctx, name)
            loss = micro_batch_loss(model, inputs, cross_entropy_fn(ctx)).loss
            loss.backward()
            grads = {n: gather_tensor_parallel(p.grad, p, ctx) for n, p in model.named_parameters() if p.grad is not None}
            result[name] = (loss.item(), grads)
        torch.save(result, Path(out) / f"rank{ctx.rank}.pt")
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    from tests.conftest import _TINY

    cfg: ModusConfig = copy.deepcopy(_TINY)
    cfg.parallel.tp = TP
    cfg.parallel.sequence_parallel = True
    cfg.data.token_budget = TOKEN_BUDGET
    cfg.model.llm.o_bias = True
    cfg.model.zero_init_llm2vae = False  # a zero head would hide gradient errors behind it
    out = tmp_path_factory.mktemp("sp")
    run_distributed(_model_worker, TP, config_to_dict(cfg), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(TP)]


def test_micro_batch_has_both_targets_and_a_length_tp_does_not_divide(results: list[dict]) -> None:
    for rank in results:
        assert rank["num_ce"] > 0 and rank["num_mse"] > 0
        assert rank["num_tokens"] % TP != 0


@pytest.mark.parametrize("twin", TWINS)
def test_loss_and_gradients_match_serial(results: list[dict], twin: str) -> None:
    for rank in results:
        serial_loss, serial_grads = rank["serial"]
        loss, grads = rank[twin]
        assert loss == pytest.approx(serial_loss, rel=1e-5)
        assert grads.keys() == serial_grads.keys()
        for name, grad in serial_grads.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert (grads[name] - grad).abs().max() <= 1e-4 * scale + 1e-7, name
        assert serial_grads["layers.0.experts.1.o_proj.bias"].abs().max() > 0


# ----------------------------------------------------------------------------- training runs


def _train(raw: dict, overrides: dict, run_dir: Path) -> None:
    run_in_layout(raw, overrides, run_dir, train)


def _runs_worker(raw: dict, names: list[str], out: str) -> None:
    for name in names:
        _train(raw, RUNS[name], Path(out) / name)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    cfg.training.steps = STEPS
    cfg.training.grad_accum_steps = 2
    cfg.training.log_every = 1
    cfg.training.optim.warmup_steps = 0
    cfg.training.wandb_mode = "disabled"
    cfg.data.token_budget = 255
    cfg.model.zero_init_llm2vae = False
    raw, out = config_to_dict(cfg), tmp_path_factory.mktemp("sp_runs")
    try:
        _train(raw, {}, out / "serial")  # one rank, in this process
    finally:
        dist.destroy_process_group()
    run_distributed(_runs_worker, 2, raw, ["tp2_sp_zero2"], str(out))
    run_distributed(_runs_worker, 4, raw, ["tp2_sp_pp2"], str(out))
    return out


def _records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(RUNS))
def test_training_run_matches_serial(runs: Path, name: str) -> None:
    serial, run = _records(runs, "serial"), _records(runs, name)
    assert [r["step"] for r in run] == list(range(STEPS))
    assert all(r["ce"] > 0 and r["mse"] > 0 for r in serial)
    for key in ("loss", "ce", "mse", "grad_norm"):
        assert [r[key] for r in run] == pytest.approx([r[key] for r in serial], rel=1e-4), key


# ----------------------------------------------------------------------------- config


def test_sequence_parallel_needs_tensor_parallelism(tiny_config: ModusConfig) -> None:
    raw = config_to_dict(tiny_config)
    raw["parallel"]["sequence_parallel"] = True
    with pytest.raises(ValueError, match="parallel.sequence_parallel"):
        config_from_dict(raw)
    raw["parallel"]["tp"] = 2
    assert config_from_dict(raw).parallel.sequence_parallel
