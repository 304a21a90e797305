"""The benchmark command end to end on a tiny random checkpoint (HF layout, made here) and 4 held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from modus_mega.datasets import synth
from modus_mega.eval.__main__ import main
from modus_mega.eval.directions import Direction, grid, parse_directions
from modus_mega.eval.runner import resolve_directions
from modus_mega.eval.suites import HELD_OUT_SEED, SynthSuite
from tests.conftest import REPO

DIRECTIONS = "rgb:depth,rgb:caption,caption:rgb,rgb:grounding,depth:seg"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["--quiet", *args])
    except SystemExit as exit_:  # a refusal (modus_mega/cli.py)
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_benchmark_writes_results_table_and_heatmap(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    code, printed, _ = _run(capsys, "--ckpt", str(checkpoint), "--suite", "synth", "--num-scenes", "4",
                            "--image-size", "32", "--steps", "1", "--directions", DIRECTIONS, "--out", str(out))  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"suite", "model", "num_scenes", "settings", "directions"}
    assert results["num_scenes"] == 4 and results["settings"]["steps"] == 1
    rows = {r["direction"]: r for r in results["directions"]}
    assert list(rows) == DIRECTIONS.split(",")
    assert set(rows["rgb:depth"]["scores"]) == {"abs_rel", "delta1", "delta2", "delta3", "rmse"}
    assert rows["rgb:depth"]["headline"] == "delta1" and 0.0 <= rows["rgb:depth"]["value"] <= 1.0
    assert {"attribute_recall", "colour_recall"} <= set(rows["rgb:caption"]["scores"])
    assert rows["caption:rgb"]["headline"] == "geneval" and rows["depth:seg"]["headline"] == "miou"
    assert 0.0 <= rows["rgb:grounding"]["value"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| rgb |" in table and "depth (delta1)" in table and table in printed
    with Image.open(out / "heatmap.png") as image:
        assert image.format == "PNG" and image.size[0] > 100


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "/nonexistent/ckpt"], "--ckpt /nonexistent/ckpt: no such directory"),
        (["--suite", "imagenet"], "unknown suite 'imagenet'"),
        (["--directions", "rgb:heatmap"], "unknown modality 'heatmap' in direction 'rgb:heatmap'"),
        (["--suite", "nyuv2", "--data-dir", "/nonexistent/nyu"], "--data-dir /nonexistent/nyu is not a directory"),
        (["--suite", "nyuv2"], "suite 'nyuv2' is not installed here: give --data-dir with"),
        (["--directions", "rgb:clip_global"], "needs clip_global, which this suite / model lacks"),
        (["--baseline", "median"], "unknown baseline 'median'"),
    ],
)
def test_each_refusal_is_one_clear_line(checkpoint: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    defaults = {"--ckpt": str(checkpoint)}
    given = dict(zip(args[::2], args[1::2]))
    argv = [a for k, v in ({**defaults, **given}).items() for a in (k, v)]
    code, _, err = _run(capsys, *argv, "--num-scenes", "2", "--image-size", "32", "--steps", "1", "--out", str(tmp_path))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("python -m modus_mega.eval: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "results.json").exists()


def test_baselines_score_the_floor_without_a_model(tmp_path: Path, capsys) -> None:
    code, printed, _ = _run(capsys, "--baseline", "majority", "--num-scenes", "3", "--image-size", "32", "--out", str(tmp_path))
    assert code == 0
    rows = {r["target"]: r for r in json.loads((tmp_path / "results.json").read_text())["directions"]}
    assert set(rows) == {"seg", "sam_seg", "canny", "sam_edge"} and all(r["source"] == "*" for r in rows.values())
    assert 0.0 < rows["seg"]["value"] < 1.0 and rows["canny"]["value"] == 0.0  # no edges predicted: F1 0
    assert "| * |" in printed


def test_the_oracle_scores_perfectly_where_the_metric_is_exact(tmp_path: Path, capsys) -> None:
    code, _, _ = _run(capsys, "--baseline", "oracle", "--num-scenes", "4", "--image-size", "32", "--out", str(tmp_path))
    assert code == 0
    rows = {r["target"]: r for r in json.loads((tmp_path / "results.json").read_text())["directions"]}
    assert len(rows) == 15  # every modality of the synthetic scenes, 1D ones without any tokenizer
    exact = ("depth", "seg", "sam_seg", "canny", "sam_edge", "caption", "detection", "grounding", "dinov2_local")
    assert all(rows[n]["value"] == 1.0 for n in exact) and rows["normal"]["value"] == 100.0
    assert rows["depth"]["scores"]["abs_rel"] < 1e-6 and rows["clip_global"]["scores"]["cosine"] > 0.999


def test_grid_is_every_ordered_pair_and_scenes_are_held_out(tmp_path: Path) -> None:
    scenes = SynthSuite(2, image_size=32).scenes(None)
    directions = resolve_directions(None, scenes)
    assert directions == grid(["rgb", "depth", "normal", "seg", "sam_seg", "canny", "sam_edge"])
    assert len(directions) == 7 * 6 and Direction(("depth", "rgb")) in directions
    assert parse_directions("rgb:depth:normal")[0].steps == ("rgb", "depth", "normal")
    with pytest.raises(ValueError, match="SOURCE:TARGET"):
        parse_directions("rgb")
    training = synth.generate_sample(0, synth.SynthConfig(image_size=32))[1]
    held_out = synth.generate_sample(0, synth.SynthConfig(image_size=32, seed=HELD_OUT_SEED))[1]
    assert (training.rgb != held_out.rgb).any() and (held_out.rgb == scenes[0].truth["rgb"]).all()


def test_a_checkpoint_without_vae_takes_the_runs_seeded_vae(checkpoint_without_vae: Path, tmp_path: Path, capsys) -> None:
    common = ["--ckpt", str(checkpoint_without_vae), "--num-scenes", "1", "--image-size", "32", "--steps", "1",
              "--directions", "rgb:depth", "--out", str(tmp_path)]  # fmt: skip
    code, _, err = _run(capsys, *common)
    assert code == 2 and "has no VAE" in err and "give --config" in err
    code, printed, _ = _run(capsys, *common, "--config", str(REPO / "configs" / "tiny.json"))
    assert code == 0 and "| rgb |" in printed
