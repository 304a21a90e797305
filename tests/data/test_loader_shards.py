"""The loader on real shards: the full pipeline, bad input counted, exact resume with workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from modus_mega.data.loader import PackedLoader
from modus_mega.data.shard_format import shard_name
from modus_mega.data.shard_reader import read_index
from modus_mega.data.shard_writer import write_index, write_shard
from modus_mega.datasets.synth import SynthConfig, sample_files, sample_key, write_dataset
from modus_mega.modalities import MODALITY_NAMES
from modus_mega.datasets.train_text import main as train_text
from modus_mega.datasets.train_vq import main as train_vq
from modus_mega.vocab import build_vocabulary
from tests.data.test_loader import assert_same_batches, take


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 good shards of 6 samples, one shard with an undecodable rgb, one cut short; tokenizers."""
    root = tmp_path_factory.mktemp("shards")
    synth = SynthConfig(image_size=64, feature_grid=4, feature_dim=16)
    write_dataset(root / "data", 24, synth, samples_per_shard=6, progress=False)
    bad = []
    for i in range(30, 36):
        files = sample_files(i, synth)
        if i == 31:
            files["rgb.jpg"] = b"not a jpeg"
        bad.append((sample_key(i), files))
    write_shard(root / "data" / shard_name("synth", 4), bad)
    write_shard(root / "data" / shard_name("synth", 5), [(sample_key(i), sample_files(i, synth)) for i in range(40, 46)])
    cut = root / "data" / shard_name("synth", 5)
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])
    write_index(root / "data", [(p.name, 6) for p in sorted((root / "data").glob("*.tar"))])
    train_text(["--shards", str(root / "data"), "--out", str(root / "text"), "--vocab-size", "400"])
    train_vq(["--shards", str(root / "data"), "--out", str(root / "vq"), "--codebook-size", "16"])
    return root


def configure(cfg, root: Path, num_workers: int) -> None:
    cfg.data.source = "shards"
    cfg.data.shards = str(root / "data")
    cfg.data.text_tokenizer = str(root / "text")
    cfg.data.vq_dir = str(root / "vq")
    cfg.data.num_workers = num_workers
    cfg.data.target_weights = {name: 1.0 for name in MODALITY_NAMES}
    cfg.model.vocab.codebook_size = 16


def make_loader(cfg) -> PackedLoader:
    return PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, build_vocabulary(cfg.model.vocab))


def test_every_modality_loads_and_bad_samples_are_counted(tiny_config, dataset: Path) -> None:
    configure(tiny_config, dataset, num_workers=0)
    assert len(read_index(dataset / "data")) == 6
    loader = make_loader(tiny_config)
    skipped, documents = Counter(), 0
    for item in loader.worker_items(0, loader.positions[0]):
        if item.epoch > 0:
            break
        skipped.update(item.skipped)
        documents += item.document is not None
    # one epoch: 36 samples stored, one undecodable, the cut shard loses its tail
    assert skipped["undecodable"] == 1
    assert skipped["truncated_tar"] >= 1
    assert documents + sum(skipped.values()) == 36
    # the training process sees the same counts through the packed stream
    take(loader, 3)
    assert loader.num_skipped > 0


def test_all_targets_reachable(tiny_config, dataset: Path) -> None:
    configure(tiny_config, dataset, num_workers=0)
    loader = make_loader(tiny_config)
    seen = set()
    for _, item in zip(range(200), loader.worker_items(0, loader.positions[0])):
        if item.document is not None:
            seen.add(item.document.target)
    assert seen == set(MODALITY_NAMES)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_on_shards(tiny_config, dataset: Path, num_workers: int) -> None:
    configure(tiny_config, dataset, num_workers)
    straight = take(make_loader(tiny_config), 10)
    first = make_loader(tiny_config)
    head = take(first, 4)
    resumed = make_loader(tiny_config)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(head + take(resumed, 6), straight)
