"""``bench/training/bench_step.py``: the baseline it extracts, the steps it times, the ratio it prints.

The training runs themselves are the loop's (tested everywhere else); here ``run_once`` is
replaced by fixed medians so the driver's bookkeeping is checked in a second.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "bench" / "training" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step", module)
    spec.loader.exec_module(module)
    return module


def test_the_baseline_is_the_commits_package_and_configs(bench, tmp_path: Path) -> None:
    short = bench.extract_commit("HEAD", tmp_path)
    assert (tmp_path / "modus_mega" / "training" / "loop.py").is_file() and (tmp_path / "configs" / "tiny.json").is_file()
    assert short and not (tmp_path / "tests").exists()
    with pytest.raises(ValueError, match="is not a commit"):
        bench.extract_commit("no-such-ref", tmp_path / "other")


def test_timed_steps_skip_the_warm_up_and_validation_records(bench, tmp_path: Path) -> None:
    records = [{"step": s, "model_tflop": 2.0, "tflops_per_gpu": 2.0 / (0.1 * (s + 1))} for s in range(4)]
    records.append({"step": 4, "val/loss": 1.0})  # a validation record has no throughput
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.step_seconds(tmp_path / "metrics.jsonl", warmup=2) == pytest.approx([0.3, 0.4])


def test_rounds_alternate_and_the_ratio_is_baseline_over_current(bench, monkeypatch, capsys) -> None:
    order = []

    def fake_run(root: Path, config: str, steps: int, warmup: int) -> float:
        order.append("current" if root == REPO else "baseline")
        return 0.1 if root == REPO else 0.12

    monkeypatch.setattr(bench, "run_once", fake_run)
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--baseline", "HEAD", "--rounds", "2"])
    bench.main()
    assert order == ["baseline", "current", "baseline", "current"]
    assert "1.20x steps/s" in capsys.readouterr().out
