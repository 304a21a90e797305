"""Training steps per second of a tiny run, in-process on the CPU: the step's cost, old commit vs new.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/training/bench_step.py [--config configs/tiny.json] [--steps 40] [--warmup 5]

Runs ``training.loop.train`` (the real loop: data, VAE encoding, forward, backward, optimizer
step, logging) for ``warmup + steps`` steps into a temporary run directory and reads each
step's time back from its ``metrics.jsonl`` record (the loop times a step from taking its
micro-batches to its loss all-reduce; ``model_tflop / tflops_per_gpu`` per rank). Prints the
median, mean and fastest step time and steps/s over the timed steps (on a loaded machine the
fastest step is the steadiest figure). It uses only the loop's public
entry points, so the same file runs at an older commit: to compare two commits, run it in
both checkouts on the same machine, one after the other, and divide the two steps/s (higher
is better); on a shared machine, repeat and take the better of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from modus_mega.config import load_config
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.loop import train

REPO = Path(__file__).resolve().parents[2]


def step_seconds(metrics: Path, warmup: int) -> list[float]:
    """Seconds of each logged step after the first ``warmup`` ones (one rank: world size 1)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["model_tflop"] / r["tflops_per_gpu"] for r in records if r["step"] >= warmup]


def main() -> None:
    """Parse, train, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.json"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            f"training.steps={args.warmup + args.steps}", "training.log_every=1", f"training.run_dir={run_dir}",
            "training.checkpoint_every=0", "training.resume=false", "training.wandb_mode=disabled",
        ]  # fmt: skip
        cfg = load_config(args.config, overrides)
        ctx = ParallelContext.initialize(cfg.parallel)
        start = time.perf_counter()
        try:
            train(cfg, ctx)
        finally:
            ctx.close()
        total = time.perf_counter() - start
        seconds = step_seconds(Path(run_dir) / "metrics.jsonl", args.warmup)
    median, mean = statistics.median(seconds), statistics.fmean(seconds)
    print(f"{Path(args.config).name}: {len(seconds)} timed steps after {args.warmup} warm-up; whole run {total:.1f} s")
    print(f"step time: median {median * 1e3:.1f} ms, mean {mean * 1e3:.1f} ms, fastest {min(seconds) * 1e3:.1f} ms")
    print(f"steps/s: {1 / median:.2f} (median step)")


if __name__ == "__main__":
    main()
