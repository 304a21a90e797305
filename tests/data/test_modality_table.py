"""A modality is its table row: two made-up ones (a 2D map, a 1D feature) added to the table alone
are written, read, augmented, rendered, put in the vocabulary, built into documents as target and
as condition, and trained on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modus_mega import modalities
from modus_mega.data.augment import apply_geometry
from modus_mega.data.loader import PackedLoader
from modus_mega.data.shard_format import SkipCounter, file_keys
from modus_mega.data.shard_reader import decode_sample
from modus_mega.data.shard_writer import encode_modality, write_index, write_shard
from modus_mega.datasets import synth
from modus_mega.datasets.train_text import main as train_text
from modus_mega.datasets.train_vq import main as train_vq
from modus_mega.modalities.geometry import Geometry
from modus_mega.vocab import build_vocabulary
from tests.conftest import REPO
from tests.data.made_up_modalities import extended_table

SYNTH = synth.SynthConfig(image_size=32, feature_grid=2, feature_dim=8, rgb_format="png")
KEPT = ("rgb", "caption")  # the real modalities the dataset keeps beside the made-up ones


@pytest.fixture(scope="module")
def extended() -> Iterator[None]:
    """The table with ``heat`` and ``toy_global`` appended, for this module's tests only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modalities, "MODALITIES", extended_table())
        yield


def made_up_files(index: int) -> dict[str, bytes]:
    """rgb, caption, a heat map (the scene's depth, in metres) and an 8-wide toy feature."""
    _, _, values = synth.generate_sample(index, SYNTH)
    files: dict[str, bytes] = {}
    for name in KEPT:
        files.update(encode_modality(name, values[name]))
    files.update(encode_modality("heat", values["depth"]))
    toy = np.random.default_rng(index).normal(size=8).astype(np.float32)
    files.update(encode_modality("toy_global", toy))
    return files


@pytest.fixture(scope="module")
def dataset(extended, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 shards of 6 samples with the made-up modalities; a text tokenizer and the toy codebook."""
    tmp_path = tmp_path_factory.mktemp("made_up")
    data = tmp_path / "data"
    data.mkdir()
    for shard in range(2):
        samples = [(synth.sample_key(i), made_up_files(i)) for i in range(shard * 6, shard * 6 + 6)]
        write_shard(data / f"made-up-{shard:06d}.tar", samples)
    write_index(data)
    train_text(["--shards", str(data), "--out", str(tmp_path / "text"), "--vocab-size", "400"])
    train_vq(["--shards", str(data), "--out", str(tmp_path / "vq"), "--codebook-size", "8", "--modalities", "toy_global"])
    return tmp_path


def overrides(root: Path) -> dict[str, object]:
    """Config changes of a shard run whose targets are the made-up modalities."""
    return {
        "data.source": "shards",
        "data.shards": str(root / "data"),
        "data.text_tokenizer": str(root / "text"),
        "data.vq_dir": str(root / "vq"),
        "data.image_size": 32,
        "data.max_conditions": 3,
        "data.target_weights": {"heat": 1.0, "toy_global": 1.0},
        "model.vocab.codebook_size": 8,
    }


def test_rows_alone_give_codec_geometry_pictures_and_vocabulary(extended, tiny_config) -> None:
    files = made_up_files(0)
    assert {"heat.png", "toy.npy"} <= set(files) and file_keys()["toy_global"] == "toy"
    sample = decode_sample("k", files.items(), SkipCounter())
    assert list(sample.modalities) == ["rgb", "caption", "heat", "toy_global"]  # table order
    assert sample.valid["heat"].shape == (32, 32)
    flipped = apply_geometry(sample, Geometry(0, 0, 32, 32, True, 16, 16))
    assert flipped.modalities["heat"].shape == (16, 16)
    assert np.array_equal(flipped.modalities["toy_global"], sample.modalities["toy_global"])
    picture = modalities.render_for_people("heat", modalities.to_image("heat", sample.modalities["heat"]))
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    vocab = build_vocabulary(tiny_config.model.vocab)
    assert list(vocab.codebooks)[-1] == "toy_global"
    assert len(vocab.start_markers) == 17 and vocab.start_marker("toy_global") == vocab.start_markers.stop - 1


def test_documents_have_them_as_target_and_condition(tiny_config, dataset: Path) -> None:
    for key, value in overrides(dataset).items():
        section, _, field = key.rpartition(".")
        target = tiny_config
        for part in section.split("."):
            target = getattr(target, part)
        setattr(target, field, value)
    vocab = build_vocabulary(tiny_config.model.vocab)
    loader = PackedLoader(tiny_config.data, tiny_config.training.timesteps, tiny_config.model, vocab)
    targets, conditions = set(), set()
    for _, item in zip(range(24), loader.worker_items(0, loader.positions[0])):
        document = item.document
        assert document is not None
        targets.add(document.target)
        markers = {vocab.start_marker(name): name for name in ("heat", "toy_global")}
        conditions |= {markers[token] for token in document.input_ids if token in markers} - {document.target}
    assert targets == {"heat", "toy_global"}
    assert conditions == {"heat", "toy_global"}


def test_training_with_them_as_target_and_condition(dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = {**overrides(dataset), "training.steps": 4, "training.log_every": 1, "training.run_dir": str(run_dir)}
    command = [sys.executable, "-m", "tests.data.made_up_modality_entry", "--config", str(REPO / "configs" / "tiny.json")]
    command += [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    logged = {key for record in records for key in record if key.startswith("loss/")}
    assert logged == {"loss/heat", "loss/toy_global"}
    assert all(np.isfinite(record["loss"]) for record in records)


DISCRETE = ("seg", "sam_seg", "canny", "sam_edge")  # snapped after generation; the other maps are continuous


@pytest.mark.parametrize("name", ["rgb", "depth", "normal", "seg", "sam_seg", "canny", "sam_edge"])
def test_every_2d_row_snaps_and_renders_for_people(name: str) -> None:
    sample = decode_sample("k", synth.sample_files(0, SYNTH).items(), SkipCounter())
    image = modalities.to_image(name, sample.modalities[name], sample.valid.get(name))  # [3, H, W]
    noise = np.random.default_rng(0).normal(scale=0.02, size=image.shape).astype(np.float32)  # well below palette spacing
    generated = np.clip(image + noise, -1.0, 1.0)
    snapped = modalities.snap(name, generated)
    assert np.array_equal(snapped, image if name in DISCRETE else generated)
    picture = modalities.render_for_people(name, generated)
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    if name == "rgb":
        assert np.array_equal(modalities.render_for_people(name, image), sample.modalities["rgb"])
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 1  # a picture, not a flat fill


def test_1d_rows_have_no_picture() -> None:
    with pytest.raises(ValueError, match="1D modality"):
        modalities.render_for_people("caption", np.zeros((3, 4, 4), np.float32))
