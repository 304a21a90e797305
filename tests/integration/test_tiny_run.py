"""The README's main job: a tiny CPU training run through the real launcher learns both directions."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_learns_caption_and_rgb(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, str(REPO / "launch" / "pretrain.py"), "--config", str(REPO / "configs" / "tiny.json"),
        "--set", "training.steps=120", "--set", "training.log_every=1", "--set", f"training.run_dir={run_dir}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "config.json").exists() and (run_dir / "loss_curves.png").stat().st_size > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 120
    for key, factor in (("loss/caption", 0.5), ("loss/rgb", 0.95)):
        values = [r[key] for r in records if key in r]
        first, last = statistics.mean(values[:15]), statistics.mean(values[-15:])
        assert last < factor * first, f"{key}: mean of the first 15 steps {first:.4f}, of the last 15 {last:.4f}"
