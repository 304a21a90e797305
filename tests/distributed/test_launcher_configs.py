"""Every layout config, ``configs/tiny*.json``, trains a few steps under the real launcher (STYLE 14).

Each file is launched as README.md shows, ``deepspeed --num_gpus N launch/pretrain.py
--config configs/<file>``, with N = tp * pp * dp ranks (CPU, gloo). dp is no config field
(it is the world size over tp * pp), so the files meant for data parallelism name theirs
in ``DATA_PARALLEL`` (README.md's table lists the same); every other file runs at dp = 1.
The glob picks up a new tiny*.json by itself, and the test fails unless it trains: exit 0,
a finite loss and gradient norm every step, the file's resolved config saved in the run
directory, and a checkpoint written at the file's layout.

A file reading shards (``data.source = shards``, i.e. tiny_shards.json) gets what
scripts/demo.sh makes for it, at a smaller size, in place of its ``runs/demo`` paths.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modus_mega.checkpoint_layout import Layout, saved_layout
from modus_mega.config import config_to_dict, load_config
from modus_mega.datasets.synth import SynthConfig, write_dataset
from modus_mega.datasets.train_text import main as train_text
from modus_mega.datasets.train_vq import main as train_vq
from tests.conftest import REPO
from tests.distributed.helpers import rendezvous_store

CONFIGS = REPO / "configs"
LAYOUT_CONFIGS = sorted(path.name for path in CONFIGS.glob("tiny*.json"))
DATA_PARALLEL = {"tiny_zero3.json": 2}  # dp of the files meant for data parallelism; the rest run at dp = 1
STEPS = 3


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/demo.sh's shards, held-out shards, caption tokenizer and feature codebooks, for 32 + 4 scenes."""
    root = tmp_path_factory.mktemp("demo")
    write_dataset(root / "data", 32, SynthConfig(image_size=64, feature_grid=4), samples_per_shard=16, progress=False)
    write_dataset(root / "val", 4, SynthConfig(image_size=64, feature_grid=4, split="val"), samples_per_shard=2, progress=False)
    train_text(["--shards", str(root / "data"), "--out", str(root / "text_tokenizer"), "--vocab-size", "512"])
    train_vq(["--shards", str(root / "data"), "--out", str(root / "vq"), "--codebook-size", "32"])
    return root


def _overrides(run_dir: Path, demo: Path | None) -> list[str]:
    """A short run into ``run_dir``; ``demo``: the shard assets in place of the file's paths."""
    overrides = [f"training.steps={STEPS}", "training.log_every=1", "data.token_budget=256", f"training.run_dir={run_dir}"]
    if demo is not None:
        overrides += [f"data.shards={demo / 'data'}", f"data.text_tokenizer={demo / 'text_tokenizer'}", f"data.vq_dir={demo / 'vq'}"]
        overrides += [f"data.val_shards={demo / 'val'}"]
    return overrides


@pytest.mark.parametrize("name", LAYOUT_CONFIGS)
def test_layout_config_trains_under_the_launcher(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = load_config(CONFIGS / name)
    layout = Layout(config.parallel.tp, config.parallel.pp, DATA_PARALLEL.get(name, 1), config.parallel.zero_stage)
    demo = request.getfixturevalue("demo_assets") if config.data.source == "shards" else None
    run_dir = tmp_path / "run"
    overrides = _overrides(run_dir, demo)
    with rendezvous_store() as store_env:
        command = [
            str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(layout.tp * layout.pp * layout.dp),
            "--master_port", store_env["MASTER_PORT"], str(REPO / "launch" / "pretrain.py"), "--config", str(CONFIGS / name),
            *(arg for item in overrides for arg in ("--set", item)),
        ]  # fmt: skip
        env = {**os.environ, **store_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if config.training.eval_every:  # the held-out loss at the end (training.eval_every > STEPS)
        *records, validation = records
        assert validation["step"] == STEPS and math.isfinite(validation["val/loss"]), validation
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records), records
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved == config_to_dict(load_config(CONFIGS / name, overrides))  # resolved: bases merged, overrides applied
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert tag == f"step_{STEPS:08d}"
    assert saved_layout(run_dir / "checkpoints" / tag) == layout
