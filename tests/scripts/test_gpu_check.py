"""``scripts/gpu_check.sh --dry-run`` resolves every stage without CUDA; ``gpu_wheels.sh --list`` names the wheels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from tests.conftest import REPO

STAGES = ["env", "install", "kernels", "attention", "mot_step", "sanitizer", "pretrain"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_lists_every_stage_and_writes_the_reports(tmp_path: Path) -> None:
    result = _run("scripts/gpu_check.sh", "--dry-run", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["dry_run"] is True
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert all(s["status"] == "dry" for s in report["stages"])
    notes = {s["stage"]: s["note"] for s in report["stages"]}
    assert all(note == "commands resolved" for stage, note in notes.items() if stage != "install"), notes
    out = result.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0a" in out and "--target" in out  # sm_90a only; torch stays the machine's
    assert "--q-heads 28 --kv-heads 4" in out and "--q-heads 7 --kv-heads 1" in out and "--tokens 8192 32768" in out
    assert "--tool memcheck" in out and "--tool racecheck" in out
    assert "bench_mot_step.py --layers 4 --tokens 32768" in out and "launch/pretrain.py" in out
    for stage in STAGES:
        assert f"| {stage} | dry |" in (tmp_path / "summary.md").read_text()


def test_stages_are_selectable_and_checked(tmp_path: Path) -> None:
    result = _run("scripts/gpu_check.sh", "--dry-run", str(tmp_path), "mot_step", "env")
    assert result.returncode == 0, result.stderr
    assert [s["stage"] for s in json.loads((tmp_path / "results.json").read_text())["stages"]] == ["env", "mot_step"]
    bad = _run("scripts/gpu_check.sh", "--dry-run", str(tmp_path), "nonsense")
    assert bad.returncode == 2 and "unknown stage 'nonsense'" in bad.stderr


def test_a_stage_over_the_remaining_budget_is_skipped(tmp_path: Path) -> None:
    """With a 10 s total, the env stage (20 s budget) is skipped with a note, not run (no CUDA needed)."""
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_TOTAL_S": "10"}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path), "env"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (stage,) = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert stage["status"] == "skipped" and "budget 20s" in stage["note"]


def test_wheel_list_names_the_venvs_versions() -> None:
    from importlib.metadata import version

    result = _run("scripts/gpu_wheels.sh", "--list")
    assert result.returncode == 0, result.stderr
    for name in ("deepspeed", "megatron-core", "torchao", "pydantic", "pydantic-core", "hjson"):
        assert f"{name}=={version(name)}" in result.stdout, name
