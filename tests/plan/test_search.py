"""Planner invariants: ranking, rejection reasons, and a config the launcher accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from modus_mega.config import ModusConfig, load_config, save_config
from modus_mega.plan.__main__ import main
from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import Layout
from modus_mega.plan.search import Plan, PlanOptions, layout_config, plan
from modus_mega.plan.shapes import ModelShape
from tests.conftest import REPO

REASON_KINDS = {"config", "budget", "batch", "memory"}


@pytest.fixture(scope="module")
def plan_256(config_7b: ModusConfig, shape_7b: ModelShape, h100: Calibration) -> Plan:
    return plan(config_7b, PlanOptions(gpus=256), h100, shape_7b)


def test_ranked_layouts_fit_and_are_sorted(plan_256: Plan, h100: Calibration) -> None:
    ranked = plan_256.ranked
    assert ranked, "7B must fit on 256 H100s"
    speeds = [c.step.tokens_per_s_per_gpu(c.layout.gpus) for c in ranked]  # type: ignore[union-attr]
    assert speeds == sorted(speeds, reverse=True)
    for candidate in ranked:
        assert candidate.layout.gpus == 256 and candidate.memory.peak <= h100.usable_bytes  # type: ignore[union-attr]
        assert 0 < candidate.step.mfu(256, h100.peak_tflops) < 1  # type: ignore[union-attr]
    assert plan_256.best() is ranked[0]


def test_every_rejection_names_its_reason(plan_256: Plan, h100: Calibration) -> None:
    assert plan_256.rejected
    for candidate in plan_256.rejected:
        assert candidate.reasons and all(r.split(":", 1)[0] in REASON_KINDS for r in candidate.reasons)
        for reason in candidate.reasons:
            if reason.startswith("memory:"):
                assert candidate.memory.peak > h100.usable_bytes and "GiB" in reason  # type: ignore[union-attr]
    zero2_pp = [c for c in plan_256.rejected if c.layout.zero_stage == 2 and c.layout.pp > 1]
    assert zero2_pp and all("pipeline" in " ".join(c.reasons) for c in zero2_pp)
    # No ZeRO and no recomputation cannot hold 7B's Adam states and activations on one H100.
    plain = [c for c in plan_256.candidates if (c.layout.tp, c.layout.pp, c.layout.zero_stage) == (1, 1, 0)]
    assert plain and all(not c.fits for c in plain)


def test_tp_that_does_not_split_the_heads_is_rejected(config_7b: ModusConfig, shape_7b: ModelShape, h100: Calibration) -> None:
    result = plan(config_7b, PlanOptions(gpus=56, tp=(7,), pp=(1,), zero_stages=(1,)), h100, shape_7b)
    assert result.candidates and not result.ranked
    assert all(c.reasons[0].startswith("config: parallel.tp: tp=7") for c in result.candidates)


def test_small_budgets_and_oversized_batches_are_rejected(config_7b: ModusConfig, shape_7b: ModelShape, h100: Calibration) -> None:
    options = PlanOptions(gpus=1024, token_budgets=(4096, 16384), tp=(1,), pp=(1,), zero_stages=(1,), recompute=("full",))
    result = plan(config_7b, options, h100, shape_7b)
    by_budget = {c.layout.token_budget: c for c in result.candidates}
    assert any(r.startswith("budget:") for r in by_budget[4096].reasons)
    assert any(r.startswith("batch:") and "exceeds the target" in r for r in by_budget[16384].reasons)


def _written(cfg: ModusConfig, layout: Layout, path: Path) -> ModusConfig:
    """``layout_config`` saved to ``path`` and loaded back as the launcher loads it."""
    save_config(layout_config(cfg, layout), path)
    return load_config(path)


def _assert_carries(loaded: ModusConfig, layout: Layout) -> None:
    par = loaded.parallel
    assert (par.tp, par.pp, par.zero_stage) == (layout.tp, layout.pp, layout.zero_stage)
    assert (par.sequence_parallel, par.recompute, par.recompute_layers) == (layout.sequence_parallel, layout.recompute, 0)
    assert (loaded.data.token_budget, loaded.training.grad_accum_steps) == (layout.token_budget, layout.grad_accum)


def test_best_layout_becomes_a_config_the_launcher_loads(plan_256: Plan, config_7b: ModusConfig, tmp_path: Path) -> None:
    best = plan_256.best()
    assert best is not None
    loaded = _written(config_7b, best.layout, tmp_path / "best.json")
    _assert_carries(loaded, best.layout)
    assert loaded.model == config_7b.model


@pytest.mark.parametrize(
    "layout",
    [Layout(4, 1, 64, 1, True, "full", 32768, 2), Layout(2, 2, 64, 1, False, "none", 16384, 4)],
    ids=lambda layout: layout.describe(),
)
def test_written_config_carries_sequence_parallel_and_recompute(config_7b: ModusConfig, layout: Layout, tmp_path: Path) -> None:
    """Both switches are written over a config that set them the other way, with recompute_layers (planned: all)."""
    other = Layout(2, 1, 128, 1, not layout.sequence_parallel, "none" if layout.recompute == "full" else "full", 16384, 2)
    cfg = layout_config(config_7b, other)
    cfg.parallel.recompute_layers = 3
    _assert_carries(_written(cfg, layout, tmp_path / "layout.json"), layout)


def test_cli_writes_the_best_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiny-2.json"
    main(["--config", str(REPO / "configs" / "tiny.json"), "--gpus", "2", "--global-batch-tokens", "2048", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "tok/s/GPU" in printed and "rejected:" in printed and f"wrote {out}" in printed
    cfg = load_config(out)
    assert cfg.parallel.tp * cfg.parallel.pp <= 2
    assert 2 // (cfg.parallel.tp * cfg.parallel.pp) * cfg.data.token_budget * cfg.training.grad_accum_steps == pytest.approx(2048, rel=0.25)
