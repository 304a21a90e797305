"""``bench/training/bench_mot_step.py --tiny`` runs on CPU and reports both precisions and their ratio."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_tiny_bench_writes_both_precisions(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_mot_step", REPO / "bench" / "training" / "bench_mot_step.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_mot_step", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "mot.json"
    bench.main(["--tiny", "--iters", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["precision"] for r in result["results"]] == ["bf16", "fp8"]
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in result["results"])
    bf16, fp8 = result["results"]
    assert result["fp8_over_bf16_tokens_per_s"] == bf16["ms"] / fp8["ms"]
    assert "fp8 vs bf16 (baseline)" in capsys.readouterr().out
