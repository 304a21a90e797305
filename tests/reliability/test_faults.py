"""The fault matrix (``bench/reliability/faults.py``) in CI: every class, one case per random kind, one kill."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.distributed.helpers import run_distributed
from tests.reliability.helpers import bench_module

CHECKPOINT_CLASSES = ["tampered_checkpoint", "truncated_checkpoint", "bit_flip_checkpoint", "missing_file",
                      "damaged_latest", "disk_full", "read_only"]  # fmt: skip


@pytest.fixture(scope="module")
def faults():
    return bench_module("faults")


def _assert_all_held(faults, out: Path, classes: list[str], table: list[str]) -> list[dict]:
    """Every class of ``classes`` tried at least one case, held them all, and printed "name tried held"."""
    outcomes = json.loads((out / "faults.json").read_text())
    for name in classes:
        mine = [o for o in outcomes if o["fault_class"] == name]
        assert mine and all(o["held"] for o in mine), (name, [o for o in mine if not o["held"]])
        assert any(line.split() == [name, str(len(mine)), str(len(mine))] for line in table), table
    assert {o["fault_class"] for o in outcomes} == set(classes)
    return outcomes


def test_configs_conversions_and_shards_hold(faults, tmp_path: Path, capsys) -> None:
    classes = ["bad_config", "bad_conversion", "bad_shards"]
    assert faults.main(["--out", str(tmp_path), "--cases", "1", "--classes", ",".join(classes)]) == 0, capsys.readouterr().out
    outcomes = _assert_all_held(faults, tmp_path, classes, capsys.readouterr().out.splitlines())
    # the config class covers every numeric field of the tree
    tried = {o["case"].split("=")[0] for o in outcomes if o["fault_class"] == "bad_config"}
    assert {"training.log_every", "training.optim.betas[0]", "data.target_weights.rgb", "model.vae.norm_groups"} <= tried
    shards = " | ".join(o["case"] for o in outcomes if o["fault_class"] == "bad_shards")
    for kind in ("npy header", "12000 x 12000", "rgb.exe", "truncated at", "random bytes", "inside decode_"):
        assert kind in shards, shards


def _checkpoint_worker(out: str) -> None:
    bench_module("faults").main(["--out", out, "--cases", "1", "--classes", ",".join(CHECKPOINT_CLASSES)])


def test_every_checkpoint_fault_is_held(faults, tmp_path: Path) -> None:
    run_distributed(_checkpoint_worker, 1, str(tmp_path))  # a process group of its own
    outcomes = json.loads((tmp_path / "faults.json").read_text())
    assert [o for o in outcomes if not o["held"]] == []
    assert {o["fault_class"] for o in outcomes} == set(CHECKPOINT_CLASSES) and len(outcomes) >= 30


def test_one_kill_and_resume_is_bit_identical(faults, tmp_path: Path, capsys) -> None:
    assert faults.main(["--out", str(tmp_path), "--kills", "1", "--classes", "kill_resume"]) == 0, capsys.readouterr().out
    [outcome] = _assert_all_held(faults, tmp_path, ["kill_resume"], capsys.readouterr().out.splitlines())
    assert "bit-identical" in outcome["detail"] and "save of step_" in outcome["detail"], outcome


def test_a_case_that_does_not_hold_or_crashes_is_counted_and_named(faults, tmp_path: Path) -> None:
    def cases(work: Path, rng: random.Random, count: int):
        yield faults.Case("accepted", lambda: (False, "accepted"))
        yield faults.Case("refused", lambda: (True, "refused"))
        yield faults.Case("crashed", lambda: 1 / 0)

    outcomes = faults.run_class(faults.FaultClass("stand_in", cases), tmp_path, seed=0, count=1)
    assert [(o.case, o.held) for o in outcomes] == [("accepted", False), ("refused", True), ("crashed", False)]
    assert outcomes[2].detail.startswith("raised ZeroDivisionError")


def test_unknown_classes_are_refused(faults, capsys) -> None:
    with pytest.raises(SystemExit):
        faults.main(["--out", "/nonexistent", "--classes", "bad_config,bad_shard"])
    assert "unknown fault class(es) ['bad_shard']" in capsys.readouterr().err
