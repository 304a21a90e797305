"""Calibration files: strict loading, and updates that benchmarks make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modus_mega.plan.calibration import DEFAULT_CALIBRATION, Calibration, load_calibration, update_calibration


def test_default_file_loads_and_cites_every_figure(h100: Calibration) -> None:
    raw = json.loads(DEFAULT_CALIBRATION.read_text())
    figures = set(raw) - {"device", "sources"}
    cited = {key.split(".")[0] for key in h100.sources}
    assert figures <= cited, f"figures without a source: {figures - cited}"
    assert h100.usable_bytes < h100.memory_gib * 2**30


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw.update(hbm_tbps=3.0), "unknown calibration key 'hbm_tbps'"),
        (lambda raw: raw.pop("ib_busbw_gbps"), "'ib_busbw_gbps' is missing"),
        (lambda raw: raw.update(overlap=1.5), "overlap"),
        (lambda raw: raw.update(peak_tflops=-1), "peak_tflops"),
        (lambda raw: raw.update(gpus_per_node="8"), "gpus_per_node must be int"),
    ],
)
def test_bad_files_name_the_field(tmp_path: Path, edit, message: str) -> None:
    raw = json.loads(DEFAULT_CALIBRATION.read_text())
    edit(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        load_calibration(path)


def test_update_merges_and_records_the_source(tmp_path: Path) -> None:
    path = tmp_path / "h100.json"
    shutil.copy(DEFAULT_CALIBRATION, path)
    before = load_calibration(path)
    after = update_calibration(path, {"layer_tflops": {"2": 612.5}, "ib_busbw_gbps": 44.0}, source="bench run 7")
    assert after.layer_tflops == {**before.layer_tflops, "2": 612.5} and after.ib_busbw_gbps == 44.0
    assert after.sources["layer_tflops.2"] == after.sources["ib_busbw_gbps"] == "bench run 7"
    assert after.sources["layer_tflops.1"] == before.sources["layer_tflops.1"]
    assert load_calibration(path) == after
    with pytest.raises(ValueError, match="tp=3"):
        after.layer_tflops_at(3)


def test_layer_benchmark_updates_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/calibration/measure_layers.py runs (tiny model, CPU) and records its figures."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("measure_layers", REPO / "bench" / "calibration" / "measure_layers.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "h100.json"
    shutil.copy(DEFAULT_CALIBRATION, path)
    config = str(REPO / "configs" / "tiny.json")
    bench.main(["--config", config, "--tp", "1,2", "--tokens", "128", "--iters", "1", "--device", "cpu", "--calibration", str(path)])
    assert "x the calibration's 560" in capsys.readouterr().out
    updated = load_calibration(path)
    assert 0 < updated.layer_tflops["1"] < 5 and 0 < updated.layer_tflops["2"] < 5  # a CPU, not an H100
    assert updated.layer_tflops["4"] == load_calibration().layer_tflops["4"]
    assert updated.sources["layer_tflops.1"].startswith("bench/calibration/measure_layers.py on cpu")
