"""The ``kill_resume`` row of the fault matrix (``bench/reliability/faults.py``): SIGKILL a real run, resume it.

A reference run (``python launch/pretrain.py --config configs/tiny.json``, ``STEPS`` steps,
a checkpoint every 2) runs uninterrupted once. Each case starts the same run in its own
directory as a subprocess and SIGKILLs it at a random moment of one of two kinds:

- *during a save*: as soon as the tag of a checkpoint step (each save in turn) appears on disk
  (polled every few milliseconds; the detail says whether its manifest, written last, was
  there yet, i.e. whether the kill landed inside the save or just after it);
- *at a random time*: a uniform fraction of the reference run's wall time after the start
  (before the first checkpoint, the resume starts over; a run that ends sooner than the
  reference did is rerun with half the time, so that every case kills).

The case then runs the same command again to the end (it resumes from ``latest``) and is
*held* when that run exits 0 and its ``metrics.jsonl`` holds one record per step whose
losses equal the reference's bit for bit (JSON floats round-trip exactly).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modus_mega.checkpoint_integrity import MANIFEST

REPO = Path(__file__).resolve().parents[2]
STEPS, CHECKPOINT_EVERY = 4, 2
POLL_S = 0.005
TIMEOUT_S = 600


def command(run_dir: Path) -> list[str]:
    """The tiny CPU run: ``STEPS`` steps, a checkpoint every ``CHECKPOINT_EVERY``, a record per step."""
    return [
        sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(REPO / "configs" / "tiny.json"),
        "--set", f"training.steps={STEPS}", "--set", "training.log_every=1",
        "--set", f"training.checkpoint_every={CHECKPOINT_EVERY}", "--set", "data.token_budget=256",
        "--set", f"training.run_dir={run_dir}",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    """One process, no launcher variables, the repository on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run_to_end(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def losses(run_dir: Path) -> list[float] | None:
    """The loss of every step in order, or None when the records are not exactly one per step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if [r.get("step") for r in records] != list(range(len(records))):
        return None
    return [r["loss"] for r in records]


def _kill_when(run_dir: Path, ready: Callable[[float], str | None]) -> str | None:
    """Start the run and SIGKILL it once ``ready(seconds since start)`` says why; why, or None if it ended first."""
    process = subprocess.Popen(command(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start, why = time.monotonic(), None
    try:
        while process.poll() is None and why is None:
            why = ready(time.monotonic() - start)
            if why is None:
                time.sleep(POLL_S)
        if why is not None:
            process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=TIMEOUT_S)
    return why


def _during_save(run_dir: Path, step: int) -> Callable[[float], str | None]:
    tag = run_dir / "checkpoints" / f"step_{step:08d}"

    def ready(_: float) -> str | None:
        if not tag.exists():
            return None
        return f"killed {'after' if (tag / MANIFEST).exists() else 'inside'} the save of {tag.name}"

    return ready


def _at_time(seconds: float) -> Callable[[float], str | None]:
    return lambda elapsed: f"killed at {elapsed:.2f} s" if elapsed >= seconds else None


def _held(run_dir: Path, reference: list[float], ready: Callable[[float], str | None]) -> tuple[bool, str]:
    """Kill, resume to the end, compare with the reference (a run that ended before its kill tested nothing)."""
    what = _kill_when(run_dir, ready)
    if what is None:
        return False, "the run ended before the kill: nothing was tested"
    resumed = _run_to_end(run_dir)
    if resumed.returncode != 0:
        return False, f"{what}; the resume exited {resumed.returncode}: {resumed.stderr.strip()[-300:]}"
    got = losses(run_dir)
    if got != reference:
        return False, f"{what}; resumed losses {got} differ from the reference {reference}"
    return True, f"{what}; resumed bit-identical over {len(got)} steps"


def _held_at_time(run_dir: Path, reference: list[float], seconds: float) -> tuple[bool, str]:
    """``_held`` with a kill ``seconds`` after the start; should this run end sooner than the reference did,
    again with half the time (up to 3 times), so that every case kills."""
    for _ in range(3):
        shutil.rmtree(run_dir, ignore_errors=True)
        held, detail = _held(run_dir, reference, _at_time(seconds))
        if "nothing was tested" not in detail:
            break
        seconds /= 2
    return held, detail


def kill_cases(work: Path, rng: random.Random, count: int) -> Iterator[tuple[str, Callable[[], tuple[bool, str]]]]:
    """``count`` kill / resume cases as (name, check), alternating a kill during a save and one at a random time
    (``rng`` draws the times)."""
    start = time.monotonic()
    result = _run_to_end(work / "reference")
    wall = time.monotonic() - start
    reference = losses(work / "reference")
    if result.returncode != 0 or reference is None or len(reference) != STEPS:
        raise RuntimeError(f"the reference run failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    for i in range(count):
        run_dir = work / f"case_{i:03d}"
        if i % 2 == 0:  # the saves in turn, a mid-run one first
            saves = range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)
            step = saves[i // 2 % len(saves)]
            yield f"SIGKILL at the save of step {step}", lambda r=run_dir, s=step: _held(r, reference, _during_save(r, s))
        else:
            seconds = rng.uniform(0, wall)
            yield f"SIGKILL {seconds:.2f} s after the start", lambda r=run_dir, t=seconds: _held_at_time(r, reference, t)
