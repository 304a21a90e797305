"""Exact resume through the real entry point (``python launch/pretrain.py``, CPU).

An uninterrupted 8-step run is the reference. A second run checkpoints every 3 steps and
is stopped twice: by SIGTERM (it checkpoints where it is and exits) and, after resuming,
by SIGKILL right after its next checkpoint appeared (nothing saved after it). Resuming
again to the end must log exactly the reference's losses, step by step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

STEPS = 8


def _command(run_dir: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(REPO / "configs" / "tiny.json"),
        "--set", f"training.steps={STEPS}", "--set", "training.log_every=1", "--set", "training.checkpoint_every=3",
        "--set", "data.token_budget=256", "--set", f"training.run_dir={run_dir}",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(run_dir: Path) -> None:
    subprocess.run(_command(run_dir), env=_env(), check=True, capture_output=True, timeout=300)


def _run_until_checkpoint(run_dir: Path, after_tag: str | None, sig: int) -> int:
    """Start a run, send ``sig`` once ``latest`` moved past ``after_tag``; the process's exit code."""
    latest = run_dir / "checkpoints" / "latest"
    process = subprocess.Popen(_command(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None:
        if latest.is_file() and latest.read_text().strip() != after_tag:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode is not None, stderr.decode()[-2000:]
    return process.returncode


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(records))), "one record per step, in order"
    return {r["step"]: r["loss"] for r in records}


def _latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _run(reference)

    assert _run_until_checkpoint(interrupted, None, signal.SIGTERM) == 0  # preemption: checkpoint, clean exit
    first_stop = _latest_step(interrupted)
    assert 3 <= first_stop < STEPS, "SIGTERM must stop the run early, at a checkpoint"

    code = _run_until_checkpoint(interrupted, f"step_{first_stop:08d}", signal.SIGKILL)
    second_stop = _latest_step(interrupted)
    assert code == -signal.SIGKILL and first_stop < second_stop < STEPS, (code, first_stop, second_stop)

    _run(interrupted)
    assert _losses(interrupted) == _losses(reference)
    assert len(_losses(reference)) == STEPS
