"""``python -m modus_mega.generate`` end to end on a tiny hf-layout checkpoint made here, and its one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modus_mega.config import load_config
from modus_mega.convert.hf import VQ_DIR, save_pretrained
from modus_mega.data.procedural import procedural_sample
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.generate.__main__ import CONTACT_SHEET, main
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.modalities.pictures import image_to_rgb
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from modus_mega.tokenizers.vq import FeatureQuantizer
from tests.conftest import REPO

SIZE = 32
CAPTIONS = ["a red cube on a blue floor", "two green spheres", "a small yellow cone next to a cube"] * 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random checkpoint in the hf layout with its tokenizer and one codebook ("full"), the same
    weights without tokenizer files ("bare") and without the VAE ("novae"), and an rgb condition of the right and of the wrong size."""
    root = tmp_path_factory.mktemp("generate")
    cfg = load_config(REPO / "configs" / "tiny.json")
    model = ModusModel(cfg.model)
    init_weights(model, 0, 0.05)
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, 0, 0.05, prefix="vae.")
    tokenizer = train_tiny_text_tokenizer(CAPTIONS, 300, root / "tokenizer")
    full = save_pretrained(model, vae, root / "full", tokenizer_dir=tokenizer)
    (full / VQ_DIR).mkdir()
    codebook = torch.randn(2, cfg.model.vocab.codebook_size, 8, generator=torch.Generator().manual_seed(0))
    FeatureQuantizer("clip_global", codebook).save(full / VQ_DIR / "clip_global.safetensors")
    bare = save_pretrained(model, vae, root / "bare")
    novae = save_pretrained(model, None, root / "novae")
    for size, name in ((SIZE, "rgb.png"), (2 * SIZE, "big.png")):
        Image.fromarray(image_to_rgb(procedural_sample(1, size, 0).images["rgb"].numpy())).save(root / name)
    return {"full": full, "bare": bare, "novae": novae, "rgb": root / "rgb.png", "big": root / "big.png", "root": root}


def _args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--out", str(out), "--size", str(SIZE), "--steps", "2", "--quiet", *extra]


def test_every_output_is_written(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    targets = ["depth", "seg", "caption", "detection", "clip_global"]
    main(_args(checkpoints["full"], out, "--cond", f"rgb={checkpoints['rgb']}", "--cond", "caption=two green spheres",
               "--chain", "--temperature", "1", *[a for t in targets for a in ("--target", t)]))  # fmt: skip
    for name in ("depth", "seg", "detection"):
        assert Image.open(out / f"{name}.png").size == (SIZE, SIZE), name
    assert (out / "caption.txt").read_text().endswith("\n")
    assert np.load(out / "clip_global.npy").shape == (8,)
    header, _, body = (out / "depth.ply").read_text().partition("end_header\n")
    count = int(re.search(r"element vertex (\d+)", header).group(1))
    rows = [line.split() for line in body.splitlines()]
    assert count > 0 and len(rows) == count and all(len(r) == 6 for r in rows)
    assert np.isfinite(np.array([r[:3] for r in rows], dtype=np.float64)).all()
    sheet = Image.open(out / CONTACT_SHEET)
    assert sheet.size[0] > 7 * SIZE  # two conditions and five targets side by side


def test_best_of_n_keeps_the_best_candidate_and_writes_the_scores(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(_args(checkpoints["full"], out, "--cond", "caption=two green spheres", "--target", "depth", "--best-of", "2"))
    report = json.loads((out / "best_of.json").read_text())["depth"]
    assert report["verifier"] == "likelihood" and len(report["scores"]) == 2
    assert report["best"] == report["scores"].index(max(report["scores"]))
    assert Image.open(out / "depth.png").size == (SIZE, SIZE)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "heatmap"], "unknown modality 'heatmap'"),
        (["--cond", "rgb=/no/such.png", "--target", "depth"], "no such file"),
        (["--cond", "big", "--target", "depth"], "64x64 px but the generation size is 32x32"),
        (["--cond", "rgb", "--target", "dinov2_global"], "needs its feature codebook"),
        (["--cond", "rgb", "--target", "grounding"], "referring expression"),
        (["--cond", "rgb", "--target", "depth", "--best-of", "2"], "--best-of needs a caption condition"),
        (["--cond", "rgb", "--target", "depth", "--best-of", "2", "--chain"], "drop --chain"),
    ],
)
def test_a_refused_request_is_one_line_and_status_2(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    files = {"rgb": f"rgb={checkpoints['rgb']}", "big": f"rgb={checkpoints['big']}"}
    extra = [files.get(e, e) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(_args(checkpoints["full"], tmp_path / "out", *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "ckpt, target, message",
    [("bare", "caption", "needs the checkpoint's text tokenizer"), ("novae", "depth", "needs the checkpoint's VAE")],
)
def test_a_checkpoint_without_what_a_target_needs_refuses_it(
    checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], ckpt: str, target: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_args(checkpoints[ckpt], tmp_path / "out", "--cond", f"rgb={checkpoints['rgb']}", "--target", target))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
