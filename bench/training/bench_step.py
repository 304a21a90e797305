"""Training steps per second of a tiny run on the CPU, this checkout against a baseline commit, side by side.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/training/bench_step.py [--baseline 0df3087] [--rounds 3]
        [--config configs/tiny.json] [--steps 60] [--warmup 5]
    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/training/bench_step.py --baseline none   # this checkout only

Each measurement runs ``training.loop.train`` (the real loop: data, VAE encoding, forward,
backward, optimizer step, logging) for ``warmup + steps`` steps in a fresh process and reads
each step's time back from its ``metrics.jsonl`` (the loop times a step from taking its
micro-batches to its loss all-reduce; ``model_tflop / tflops_per_gpu`` on one rank). The
baseline is the package and configs of ``--baseline`` extracted with ``git archive`` into a
temporary directory and imported from there (this file uses only the loop's public entry
points, which every commit since the training loop has), with the config of the same name
from the baseline's own tree. Baseline and current runs alternate for ``--rounds`` rounds
so that a machine's slow phases hit both; each run prints its median step, and the
summary gives the median over rounds and the ratio current / baseline in steps/s (above
1: the current checkout steps faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "BENCH_STEP_RESULT "


def step_seconds(metrics: Path, warmup: int) -> list[float]:
    """Seconds of each logged step after the first ``warmup`` ones (one rank: world size 1)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["model_tflop"] / r["tflops_per_gpu"] for r in records if r["step"] >= warmup and "tflops_per_gpu" in r]


def measure(config: str, steps: int, warmup: int) -> list[float]:
    """Train ``warmup + steps`` steps of ``config`` in this process; the timed steps' seconds."""
    from modus_mega.config import load_config
    from modus_mega.parallel.context import ParallelContext
    from modus_mega.training.loop import train

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"training.steps={warmup + steps}", "training.log_every=1", f"training.run_dir={run_dir}",
            "training.checkpoint_every=0", "training.resume=false", "training.wandb_mode=disabled",
        ]  # fmt: skip
        ctx = ParallelContext.initialize(load_config(config, overrides).parallel)
        try:
            train(load_config(config, overrides), ctx)
        finally:
            ctx.close()
        return step_seconds(Path(run_dir) / "metrics.jsonl", warmup)


def extract_commit(ref: str, into: Path) -> str:
    """Write ``ref``'s ``modus_mega/`` and ``configs/`` into ``into``; returns its short hash.

    Raises ``ValueError`` with the fix when ``ref`` is not a commit of this repository.
    """
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"], capture_output=True, text=True)
    if found.returncode:
        raise ValueError(f"--baseline {ref!r} is not a commit of {REPO}; give a hash or tag from `git log`, or 'none'")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "modus_mega", "configs"], capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return found.stdout.strip()


def run_once(package_root: Path, config: str, steps: int, warmup: int) -> float:
    """The median step seconds of one fresh process importing ``modus_mega`` from ``package_root``."""
    env = dict(os.environ, PYTHONPATH=str(package_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, __file__, "--single", "--config", str(package_root / config),
               "--steps", str(steps), "--warmup", str(warmup)]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=package_root, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        raise RuntimeError(f"the run in {package_root} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return float(lines[-1][len(RESULT_PREFIX) :])


def main() -> None:
    """Parse; one measurement (``--single``) or the side-by-side comparison.

    Imports nothing of the project's at module level: ``--single`` runs import the baseline's
    package, which may predate any helper of today's. A wrong ``--baseline`` is argparse's
    one-line usage error (exit status 2).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.json", help="relative to each checkout's root")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--baseline", default="0df3087", help="commit to compare with ('none': this checkout only); "
                        "0df3087 is the last commit before the structure rework (#11)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline / current runs")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one run, for the comparison
    args = parser.parse_args()
    if args.single:
        print(f"{RESULT_PREFIX}{statistics.median(measure(args.config, args.steps, args.warmup))}", flush=True)
        return

    medians: dict[str, list[float]] = {"current": []}
    with tempfile.TemporaryDirectory() as baseline_root:
        label = None
        if args.baseline != "none":
            try:
                label = f"baseline {extract_commit(args.baseline, Path(baseline_root))}"
            except ValueError as error:
                parser.error(str(error))
            medians[label] = []
        for round_index in range(args.rounds):
            for name, root in ((label, Path(baseline_root)), ("current", REPO)):
                if name is None:
                    continue
                seconds = run_once(root, args.config, args.steps, args.warmup)
                medians[name].append(seconds)
                print(f"round {round_index + 1}/{args.rounds} {name}: median step {seconds * 1e3:.1f} ms", flush=True)
    print(f"{args.config}: {args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds, median of the rounds' medians")
    for name, values in medians.items():
        print(f"  {name}: {statistics.median(values) * 1e3:.1f} ms/step, {1 / statistics.median(values):.2f} steps/s")
    if label is not None:
        ratio = statistics.median(medians[label]) / statistics.median(medians["current"])
        print(f"current / {label}: {ratio:.2f}x steps/s (above 1: current is faster)")


if __name__ == "__main__":
    main()
