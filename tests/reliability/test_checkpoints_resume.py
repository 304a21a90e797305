"""Damaged and tampered checkpoints through the real training loop (one CPU rank, ZeRO 1).

A 6-step run checkpointing every 2 steps is the reference. Another run stops after 4
steps; then:

- tampered: a copy whose step-4 model-states file holds an object whose ``__reduce__``
  would create a marker file, with the manifest rewritten to match (an attacker who can
  write files can write it too): the resume is refused naming that file, and the marker
  never appears (DeepSpeed's loads go through the weights-only engine);
- damaged: the step-4 model file truncated and a torn last line appended to
  ``metrics.jsonl``: ``resume: true`` is refused naming step 4 and proposing step 2;
  ``resume: fallback`` resumes from step 2, drops the torn line, and logs exactly the
  reference's losses for every step (ZeRO 1's optimizer files, with DeepSpeed's loss
  scaler and fragment addresses, load weights-only); with ``training.keep_last = 2`` only
  the tags of steps 4 and 6 remain.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from modus_mega.checkpoint_integrity import MANIFEST, DamagedCheckpointError, tags, write_manifest
from modus_mega.config import config_to_dict
from modus_mega.safe_loading import UnsafeCheckpointError, safe_load
from modus_mega.training.loop import train
from tests.distributed.helpers import run_distributed, run_in_layout
from tests.reliability.helpers import checkpoint_cases

BASE = {"training.steps": 4, "training.checkpoint_every": 2, "training.log_every": 1, "parallel.zero_stage": 1}
SIX = {**BASE, "training.steps": 6}
MODEL = "step_00000004/mp_rank_00_model_states.pt"


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(records))), "one record per step, in order"
    return {r["step"]: r["loss"] for r in records}


def _refusal(raw: dict, overrides: dict, run_dir: Path, error: type[Exception]) -> str:
    try:
        run_in_layout(raw, overrides, run_dir, train)
    except error as e:
        return str(e)
    raise AssertionError(f"{run_dir} resumed although damaged")


def _worker(raw: dict, out: str) -> None:
    out_dir = Path(out)
    results = {}
    run_in_layout(raw, SIX, out_dir / "reference", train)
    run_in_layout(raw, BASE, out_dir / "run", train)

    tampered = out_dir / "tampered"
    shutil.copytree(out_dir / "run", tampered)
    states = safe_load(tampered / "checkpoints" / MODEL)
    torch.save({**states, "args": checkpoint_cases().Evil(out_dir / "marker")}, tampered / "checkpoints" / MODEL)
    (tampered / "checkpoints" / "step_00000004" / MANIFEST).unlink()
    write_manifest(tampered / "checkpoints" / "step_00000004", [])
    results["tampered"] = _refusal(raw, SIX, tampered, UnsafeCheckpointError)

    model = out_dir / "run" / "checkpoints" / MODEL
    model.write_bytes(model.read_bytes()[:1000])
    with (out_dir / "run" / "metrics.jsonl").open("a") as log:
        log.write('{"step": 4, "lo')  # the kill cut this write
    results["refused"] = _refusal(raw, SIX, out_dir / "run", DamagedCheckpointError)
    run_in_layout(raw, {**SIX, "training.resume": "fallback", "training.keep_last": 2}, out_dir / "run", train)
    (out_dir / "results.json").write_text(json.dumps(results))


def test_tampered_refused_damaged_refused_then_fallback_resumes_exactly(tmp_path: Path, tiny_config) -> None:
    raw = config_to_dict(tiny_config)
    raw["data"]["token_budget"] = 256
    run_distributed(_worker, 1, raw, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())

    assert str(tmp_path / "tampered" / "checkpoints" / MODEL) in results["tampered"], results["tampered"]
    assert not (tmp_path / "marker").exists(), "the tampered file's code ran"
    assert "step_00000004" in results["refused"] and "newest complete tag is step_00000002" in results["refused"]

    assert _losses(tmp_path / "run") == _losses(tmp_path / "reference")
    assert len(_losses(tmp_path / "reference")) == 6
    assert (tmp_path / "run" / "checkpoints" / "step_00000004.damaged").is_dir()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000006"
    assert tags(tmp_path / "run" / "checkpoints") == ["step_00000004", "step_00000006"]  # keep_last=2
    assert os.path.getsize(tmp_path / "run" / "checkpoints" / "step_00000006" / MANIFEST) > 0
