"""``training.precision`` through whole runs on CPU: bf16 tracks fp32, FP8 tracks bf16, and a run changes precision on resume.

A run resumes between bf16 and FP8 freely; between fp32 and the two it is refused with the fix
(DeepSpeed's bf16 optimizer saves its state in another form, ``training/checkpoint.py``).

Runs go through ``training.loop.train`` in-process (the launcher's body) on configs/tiny.json
at a 256-token budget with a constant learning rate after warm-up, so a run's first k steps
do not depend on ``training.steps`` and a run cut in legs follows the same schedule.

Tolerances. A step's loss is that of its own packed batch (caption-only, image-only or
mixed steps alternate), and two runs' trajectories drift apart as they train, so curves are
compared by the mean loss over windows of ``WINDOW`` steps, relative to the reference run's:

- bf16 vs fp32, 30 steps: ``BF16_RTOL`` = 4%. bf16 keeps 8 significant bits (a relative
  rounding of 2^-9 per value); the master weights stay fp32 in DeepSpeed's optimizer, but the
  bf16 run learns measurably slower on this tiny model: 0.7% apart over steps 0-9, 1.9% over
  steps 10-19 when the bound was set, about twice that as the bound;
- FP8 vs bf16, 50 steps, and an FP8 run resumed in bf16 and back vs the uninterrupted FP8
  run: ``FP8_RTOL`` = 3%. e4m3 keeps 4 significant bits (2^-5 per value) in the forward and
  e5m2 3 bits (2^-4) in the gradients, with one dynamic scale per tensor; the loss, embedding,
  head and connectors stay bf16 and the master weights fp32, so the curves stay close: 0.5%
  at most (FP8 vs bf16) and 1.2% (resumed vs uninterrupted) when the bound was set. Single
  steps differ more (one caption step's loss, 1.14 against 1.30 late in the runs), hence windows.
  The bound fails for a wrong scale: with every amax divided by 8 (values saturate at the
  e4m3 maximum) the FP8 run's windows were 4.6%, 8.4%, 1.3%, 11% and 5.9% off bf16's;
- FP8 at tp = 2 (two spawned ranks) vs tp = 1, 5 steps, each step: ``TP2_RTOL`` = 0.5%; the two
  differ by summation order only (``tests/parallel_fp8`` proves the same scales and outputs at
  model level), through the bf16 roundings: 0.05% at most when the bound was set.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.loop import RunResult, train
from modus_mega.training.metrics import read_jsonl
from tests.distributed.helpers import run_distributed

STEPS = 50  # the issue asks for 50 FP8 steps against bf16
BF16_STEPS = 30  # bf16 against fp32: the first 30 steps of the same runs
WINDOW = 10  # steps per compared mean
BF16_RTOL = 0.04
FP8_RTOL = 0.03
RESUME_AT = (20, 35)  # FP8 until 20, bf16 until 35, FP8 again until STEPS
TP2_STEPS = 5
TP2_RTOL = 0.005


def _configure(base: ModusConfig, run_dir: Path, precision: str, steps: int) -> ModusConfig:
    cfg = copy.deepcopy(base)
    cfg.data.token_budget = 256
    cfg.training.optim.schedule = "constant"  # the first k steps do not depend on training.steps
    cfg.training.precision, cfg.training.steps, cfg.training.log_every = precision, steps, 1
    cfg.training.run_dir, cfg.training.wandb_mode = str(run_dir), "disabled"
    return cfg


def _train(cfg: ModusConfig) -> RunResult:
    """Train ``cfg``, resuming from its run directory's latest checkpoint if any."""
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        return train(cfg, ctx)
    finally:
        ctx.close()


def _losses(result: RunResult) -> dict[int, float]:
    """The loss of each step the run directory's log holds (a resumed run's earlier legs included)."""
    return {record["step"]: record["loss"] for record in result.records}


def _assert_tracks(got: dict[int, float], reference: dict[int, float], rtol: float, what: str, window: int = WINDOW) -> None:
    """Every loss of ``got`` is finite, and its mean over each ``window`` steps is within ``rtol`` of ``reference``'s."""
    steps = sorted(got)
    assert steps and set(steps) <= reference.keys() and len(steps) % window == 0, what
    for step in steps:
        assert math.isfinite(got[step]), f"{what}: step {step} loss {got[step]}"
    for start in range(0, len(steps), window):
        span = steps[start : start + window]
        mean, want = (sum(losses[s] for s in span) / window for losses in (got, reference))
        error = abs(mean - want) / want
        where = f"{what}: steps {span[0]}-{span[-1]} mean loss {mean:.5f} vs {want:.5f}"
        assert error <= rtol, f"{where}, relative {error:.4f} > {rtol}"


@pytest.fixture(scope="module")
def curves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    """Per precision, the loss of every step of an uninterrupted run."""
    from tests.conftest import _TINY

    root = tmp_path_factory.mktemp("precision")
    runs = {"fp32": BF16_STEPS, "bf16": STEPS, "fp8": STEPS}
    return {name: _losses(_train(_configure(_TINY, root / name, name, steps))) for name, steps in runs.items()}


def test_bf16_tracks_fp32(curves: dict[str, dict[int, float]]) -> None:
    bf16 = {step: loss for step, loss in curves["bf16"].items() if step < BF16_STEPS}
    _assert_tracks(bf16, curves["fp32"], BF16_RTOL, "bf16 vs fp32")
    assert bf16 != curves["fp32"], "the bf16 run must compute in bf16"


def test_fp8_tracks_bf16_for_50_steps(curves: dict[str, dict[int, float]]) -> None:
    assert len(curves["fp8"]) == STEPS
    _assert_tracks(curves["fp8"], curves["bf16"], FP8_RTOL, "fp8 vs bf16")
    assert curves["fp8"] != curves["bf16"], "the FP8 run must compute in FP8"


def test_fp8_run_resumes_in_bf16_and_back(curves: dict[str, dict[int, float]], tmp_path: Path) -> None:
    from tests.conftest import _TINY

    start = 0
    for precision, steps in (("fp8", RESUME_AT[0]), ("bf16", RESUME_AT[1]), ("fp8", STEPS)):
        result = _train(_configure(_TINY, tmp_path, precision, steps))
        assert result.resumed_from == start, f"the {precision} leg must resume at step {start}"
        start = steps
    resumed = _losses(result)
    assert sorted(resumed) == list(range(STEPS))
    for step in range(RESUME_AT[0]):  # the first leg is the uninterrupted run's beginning
        assert resumed[step] == curves["fp8"][step], step
    _assert_tracks(resumed, curves["fp8"], FP8_RTOL, "fp8 -> bf16 -> fp8 vs fp8")


def _tp2_worker(raw: dict, run_dir: str) -> None:
    cfg = _configure(config_from_dict(raw), Path(run_dir), "fp8", TP2_STEPS)
    cfg.parallel.tp = 2
    _train(cfg)


def test_fp8_at_tp2_tracks_tp1(curves: dict[str, dict[int, float]], tmp_path: Path) -> None:
    from tests.conftest import _TINY

    run_distributed(_tp2_worker, 2, config_to_dict(_TINY), str(tmp_path))
    tp2 = {record["step"]: record["loss"] for record in read_jsonl(tmp_path / "metrics.jsonl")}
    assert sorted(tp2) == list(range(TP2_STEPS))
    _assert_tracks(tp2, curves["fp8"], TP2_RTOL, "fp8 at tp = 2 vs tp = 1", window=1)


def test_fp32_checkpoint_refuses_a_bf16_resume_naming_the_fix(tmp_path: Path) -> None:
    """DeepSpeed's optimizer state has another form with bf16 on: the resume says so before DeepSpeed fails."""
    from tests.conftest import _TINY

    _train(_configure(_TINY, tmp_path, "fp32", 1))
    with pytest.raises(ValueError, match="bf16 optimizer off and this run has it on.*training.precision=fp32"):
        _train(_configure(_TINY, tmp_path, "fp8", 2))
