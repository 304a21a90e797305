"""The fault matrix (``bench/reliability/faults.py``) in CI: every class, one case per random kind."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def faults():
    spec = importlib.util.spec_from_file_location("faults", REPO / "bench" / "reliability" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_case_of_every_class_holds(faults, tmp_path: Path, capsys) -> None:
    assert faults.main(["--out", str(tmp_path), "--cases", "1"]) == 0, capsys.readouterr().out
    table = capsys.readouterr().out.splitlines()
    outcomes = json.loads((tmp_path / "faults.json").read_text())
    for name in faults.FAULT_CLASSES:
        mine = [o for o in outcomes if o["fault_class"] == name]
        assert mine and all(o["held"] for o in mine), name
        assert any(line.split() == [name, str(len(mine)), str(len(mine))] for line in table), table
    # the config class covers every numeric field of the tree
    tried = {o["case"].split("=")[0] for o in outcomes if o["fault_class"] == "bad_config"}
    assert {"training.log_every", "training.optim.betas[0]", "data.target_weights.rgb", "model.vae.norm_groups"} <= tried


def test_a_case_that_does_not_hold_is_counted_and_named(faults, tmp_path: Path) -> None:
    def cases(work: Path, rng: random.Random, count: int):
        yield faults.Case("accepted", lambda: (False, "accepted"))
        yield faults.Case("refused", lambda: (True, "refused"))

    outcomes = faults.run_class(faults.FaultClass("stand_in", cases), tmp_path, seed=0, count=1)
    assert [(o.case, o.held) for o in outcomes] == [("accepted", False), ("refused", True)]
