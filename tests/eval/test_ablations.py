"""The ablation commands on a tiny random checkpoint, 2 held-out scenes and 1-2 flow steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from modus_mega.eval.ablations import main

FAST = ["--num-scenes", "2", "--image-size", "32", "--quiet"]


def test_steps_writes_one_variant_per_step_count_and_a_line_plot(checkpoint: Path, tmp_path: Path, capsys) -> None:
    code = main(["steps", "--ckpt", str(checkpoint), "--step-list", "1,2", "--directions", "rgb:depth", *FAST,
                 "--out", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    record = json.loads((tmp_path / "ablation.json").read_text())
    assert record["ablation"] == "steps" and list(record["variants"]) == ["1", "2"]
    assert [v["settings"]["steps"] for v in record["variants"].values()] == [1, 2]
    assert "| 1 |" in printed and "| 2 |" in printed and "rgb:depth (delta1)" in printed
    with Image.open(tmp_path / "steps.png") as image:
        assert image.format == "PNG"


def test_chained_and_condition_mode_variants(checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert main(["chained", "--ckpt", str(checkpoint), "--steps", "1", *FAST, "--out", str(tmp_path / "c")]) == 0
    chained = json.loads((tmp_path / "c" / "ablation.json").read_text())["variants"]
    assert [r["direction"] for r in chained["direct"]["directions"]] == ["rgb:normal"]
    assert [r["direction"] for r in chained["chained"]["directions"]] == ["rgb:depth:normal"]
    assert chained["chained"]["settings"]["chain"] is False  # the runner chains a 3-step direction per request
    assert "normal (within_30)" in capsys.readouterr().out
    assert main(["condition_mode", "--ckpt", str(checkpoint), "--steps", "1", "--directions", "rgb:depth", *FAST,
                 "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    modes = json.loads((tmp_path / "m" / "ablation.json").read_text())["variants"]
    assert {k: v["settings"]["condition_mode_2d"] for k, v in modes.items()} == {"vit": "vit", "vae": "vae", "both": "both"}


def test_best_of_n_compares_best_of_1_with_each_verifier(checkpoint: Path, tmp_path: Path) -> None:
    assert main(["best_of_n", "--ckpt", str(checkpoint), "--steps", "1", "--candidates", "2", *FAST,
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    variants = json.loads((tmp_path / "ablation.json").read_text())["variants"]
    assert list(variants) == ["best_of_1", "likelihood_best_of_2", "grounding_best_of_2"]
    assert "best_of" not in variants["best_of_1"]["settings"]
    assert variants["grounding_best_of_2"]["settings"]["verifier"] == "grounding"
    assert variants["grounding_best_of_2"]["settings"]["best_of"] == 2
    assert [r["direction"] for r in variants["likelihood_best_of_2"]["directions"]] == ["caption:rgb"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["best_of_n", "--candidates", "1"], "--candidates 1"),
        (["ablate_everything"], "unknown ablation 'ablate_everything'"),
        (["steps", "--step-list", "0,x"], "--step-list '0,x' must be positive integers"),
        (["chained", "--directions", "rgb:normal"], "give both"),
    ],
)
def test_refusals_are_one_line(checkpoint: Path, tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--ckpt", str(checkpoint), *FAST, "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m modus_mega.eval.ablations: error:") and message in err[0]
