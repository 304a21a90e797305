"""launch/slurm/hostfile.py: SLURM node-list expansion and DeepSpeed hostfiles."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("slurm_hostfile", REPO / "launch" / "slurm" / "hostfile.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hostfile = _load()


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[001-004,010]", ["node001", "node002", "node003", "node004", "node010"]),
        ("gpu7", ["gpu7"]),
        ("a[1-2],b3,c[09-11]", ["a1", "a2", "b3", "c09", "c10", "c11"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
        ("dgx-h100-[3,5]-ib", ["dgx-h100-3-ib", "dgx-h100-5-ib"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert hostfile.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "message"),
    [("node[1-3", "open"), ("node1-3]", "never opened"), ("node[3-1]", "backwards"), ("node[a-b]", "neither"), (",", "no host")],
)
def test_bad_nodelists_raise(nodelist: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hostfile.expand_nodelist(nodelist)


def test_hostfile_text() -> None:
    assert hostfile.hostfile_text(["n1", "n2"], 8) == "n1 slots=8\nn2 slots=8\n"
    with pytest.raises(ValueError, match="once"):
        hostfile.hostfile_text(["n1", "n1"], 8)
    with pytest.raises(ValueError, match="slots"):
        hostfile.hostfile_text(["n1"], 0)


def test_scontrol_is_preferred_when_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "from-scontrol-1\\nfrom-scontrol-2\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert hostfile.hostnames("node[1-2]") == ["from-scontrol-1", "from-scontrol-2"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert hostfile.hostnames("node[1-2]") == ["node1", "node2"]


def test_cli_writes_hostfile_and_prints_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-scontrol"))
    out = tmp_path / "job" / "hostfile"
    hostfile.main(["--nodelist", "gpu[07-08]", "--slots", "4", "--out", str(out), "--head"])
    assert capsys.readouterr().out == "gpu07\n"
    assert out.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
