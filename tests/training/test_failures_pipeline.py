"""Non-finite steps under pipeline parallelism: skipped on every stage, counted, and fatal in a row.

Two gloo ranks, pp = 2, whole training runs (``training.loop.train``) of two micro-batches
per step, with ZeRO 0 (our step gate runs inside our optimizer's step) and ZeRO 1 (fp32:
DeepSpeed's own non-finite norm check skips the step first, and the gate takes its verdict
afterwards). Faults come from the test only:

    step 0  clean
    step 1  the loss of the step's second micro-batch times NaN (last stage, rank 1)
    step 2  clean: training goes on
    step 3  a finite loss whose gradient turns NaN inside stage 0 (rank 0)
    step 4  NaN loss again: the second bad step in a row, training.max_bad_steps = 2

Each step's weights, Adam moments and EMA are compared before and after it on each stage.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from megatron.core import parallel_state

from modus_mega.config import config_from_dict, config_to_dict
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.failures import NonFiniteTrainingError
from tests.distributed.helpers import run_distributed
from tests.training.test_failures import _configure, _NaNGradient, _snapshot

ACCUM = 2
NAN_LOSS_STEPS = {1, 4}
NAN_GRADIENT_STEP = 3
LAYOUTS = {"zero0": 0, "zero1": 1}


def _faulty_loss(original):
    """``modus_loss`` with the loss of each NAN_LOSS_STEPS step's second micro-batch times NaN."""
    calls = itertools.count()

    def loss(*args, **kwargs):
        terms = original(*args, **kwargs)
        step, micro = divmod(next(calls), ACCUM)
        return dataclasses.replace(terms, loss=terms.loss * float("nan")) if step in NAN_LOSS_STEPS and micro == 1 else terms

    return loss


def _changed_kinds(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Which of "adam", "ema", "param" (``_snapshot``'s key prefixes) a step changed or created."""
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    return sorted({k.split("/")[0] for k in changed})


def _watched(build_engine, steps: list[dict]):
    """``build_engine`` whose engine records, per step, its health and what the step changed."""

    def build(cfg, ctx: ParallelContext):
        engine = build_engine(cfg, ctx)
        train_step = engine.train_step

        def watched_train_step(*args):
            step = len(steps)
            handle = None
            if step == NAN_GRADIENT_STEP and ctx.pp_rank == 0:
                first_layer = next(iter(engine.model.stage.layers.values()))
                handle = first_layer.register_forward_hook(lambda module, inputs, out: _NaNGradient.apply(out))
            before = _snapshot(engine)
            sums = train_step(*args)
            after = _snapshot(engine)
            if handle is not None:
                handle.remove()
            changed = _changed_kinds(before, after)
            finite = all(torch.isfinite(t).all() for t in after.values())
            steps.append({"health": dataclasses.asdict(engine.last_health), "changed": changed, "finite": finite})
            return sums

        engine.train_step = watched_train_step
        return engine

    return build


def _worker(raw: dict, out: str) -> None:
    import modus_mega.training.loop as loop
    import modus_mega.training.step as step_module

    for name, zero_stage in LAYOUTS.items():
        cfg = config_from_dict(copy.deepcopy(raw))
        cfg.parallel.zero_stage = zero_stage
        cfg.training.run_dir = str(Path(out) / name)
        ctx = ParallelContext.initialize(cfg.parallel)
        steps: list[dict] = []
        error = None
        try:
            with (
                mock.patch.object(step_module, "modus_loss", _faulty_loss(step_module.modus_loss)),
                mock.patch.object(loop, "build_engine", _watched(loop.build_engine, steps)),
            ):
                loop.train(cfg, ctx)
        except NonFiniteTrainingError as caught:
            error = str(caught)
        finally:
            parallel_state.destroy_model_parallel()  # the process group stays for the next layout
        result = {"steps": steps, "error": error}
        (Path(out) / name / f"rank{ctx.rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from tests.conftest import _TINY

    cfg = _configure(_TINY)
    cfg.parallel.pp = 2
    cfg.training.steps = 8
    cfg.training.grad_accum_steps = ACCUM
    cfg.training.max_bad_steps = 2
    cfg.training.log_every = 1
    cfg.training.checkpoint_every = 0
    out = tmp_path_factory.mktemp("failures_pipeline")
    run_distributed(_worker, 2, config_to_dict(cfg), str(out))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_skips_nonfinite_steps_on_every_stage(runs: Path, layout: str) -> None:
    # the last stage (rank 1) computes the loss; a NaN loss makes every gradient NaN on both stages
    nan_loss = {"nonfinite_loss_ranks": [1], "nonfinite_grad_ranks": [0, 1]}
    expected_health = [{"nonfinite_loss_ranks": [], "nonfinite_grad_ranks": []}] * 5
    expected_health[1] = expected_health[4] = nan_loss
    expected_health[3] = {"nonfinite_loss_ranks": [], "nonfinite_grad_ranks": [0]}
    for rank in range(2):
        steps = json.loads((runs / layout / f"rank{rank}.json").read_text())["steps"]
        assert [s["health"] for s in steps] == expected_health, (rank, steps)
        applied = ["adam", "ema", "param"]  # a step changes all three on every stage ...
        assert [s["changed"] for s in steps] == [applied, [], applied, [], []], (rank, steps)  # ... a skipped one none
        assert all(s["finite"] for s in steps), rank


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_counts_skipped_steps_and_stops_every_rank(runs: Path, layout: str) -> None:
    for rank in range(2):
        error = json.loads((runs / layout / f"rank{rank}.json").read_text())["error"]
        assert error is not None, f"rank {rank} did not stop"
        assert error.startswith(
            "step 4: non-finite loss on ranks [1]; non-finite gradient on ranks [0, 1]. Steps 3..4 (2 in a row"
        ), (rank, error)
    records = [json.loads(line) for line in (runs / layout / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]
