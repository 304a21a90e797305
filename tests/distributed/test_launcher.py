"""The real launcher: ``deepspeed --num_gpus 2 launch/pretrain.py`` (2 CPU ranks, gloo), tp = 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.distributed.helpers import free_port


def test_deepspeed_launcher_trains_tensor_parallel(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    command = [
        str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "pretrain.py"),
        "--config", str(REPO / "configs" / "tiny.json"), "--set", "parallel.tp=2", "--set", "training.steps=2",
        "--set", "training.log_every=1", "--set", "data.token_budget=256", "--set", f"training.run_dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert json.loads((run_dir / "config.json").read_text())["parallel"]["tp"] == 2
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert tag == "step_00000002"
    assert sorted(p.name for p in (run_dir / "checkpoints" / tag / "extras").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
