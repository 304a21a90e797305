"""Golden loss curves: a refactor must keep a tiny run's losses bit-identical (STYLE 14).

Two runs through the real launchers, CPU, fp32, fixed seeds:

- ``configs/tiny.json`` for 20 steps, one process (``launch/pretrain.py``);
- ``configs/tiny_tp2_pp2.json`` for 5 steps, four ranks (``deepspeed --num_gpus 4``).

Every logged loss field of every step (``loss``, ``ce``, ``mse``, ``loss/<modality>``) is
compared for exact float equality with ``tests/assets/golden_losses.json``. The file was
written on the code before the structure issue's refactor; a change that alters the
arithmetic of a step (an op order, a dtype, a seed path) fails here. To record new values
deliberately (and say why in the commit): ``MODUS_UPDATE_GOLDEN=1 pytest tests/integration/test_golden_losses.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed.helpers import rendezvous_store

GOLDEN = REPO / "tests" / "assets" / "golden_losses.json"
RUNS = {  # name: (config file, steps, ranks)
    "tiny": ("tiny.json", 20, 1),
    "tiny_tp2_pp2": ("tiny_tp2_pp2.json", 5, 4),
}


def _loss_fields(record: dict) -> dict[str, float]:
    """The loss values of one metrics.jsonl record (throughput and timing fields vary run to run)."""
    return {k: v for k, v in record.items() if k in ("loss", "ce", "mse") or k.startswith("loss/")}


def _train(name: str, run_dir: Path) -> list[dict[str, float]]:
    """Run ``RUNS[name]`` into ``run_dir``; its loss fields per step."""
    config, steps, ranks = RUNS[name]
    overrides = [f"training.steps={steps}", "training.log_every=1", f"training.run_dir={run_dir}"]
    script = [str(REPO / "launch" / "pretrain.py"), "--config", str(REPO / "configs" / config)]
    script += [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if ranks == 1:
        done = subprocess.run([sys.executable, *script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    else:
        with rendezvous_store() as store_env:
            launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks)]
            launcher += ["--master_port", store_env["MASTER_PORT"]]
            done = subprocess.run(
                launcher + script, cwd=REPO, env={**env, **store_env}, capture_output=True, text=True, timeout=600
            )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(steps))
    return [_loss_fields(r) for r in records]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_match_the_golden_curve(name: str, tmp_path: Path) -> None:
    losses = _train(name, tmp_path / "run")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("MODUS_UPDATE_GOLDEN") == "1":
        golden[name] = losses
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert name in golden, f"no golden curve for {name!r} in {GOLDEN}; record it with MODUS_UPDATE_GOLDEN=1"
    for step, (got, want) in enumerate(zip(losses, golden[name], strict=True)):
        assert got == want, f"{name} step {step}: losses {got} differ from the golden {want}"
