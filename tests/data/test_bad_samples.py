"""One malformed sample never ends the job (issue #15): hostile sizes are refused from headers,
any exception skips only its sample, unknown members are counted, and a source that yields
nothing stops with a message instead of reading forever."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modus_mega.config import DataConfig, config_from_dict, config_to_dict
from modus_mega.data.shard_format import SkipCounter, shard_name
from modus_mega.data.shard_reader import decode_sample, iter_shard
from modus_mega.data.shard_writer import write_index, write_shard
from modus_mega.data.sources import ShardSource
from modus_mega.datasets import synth
from modus_mega.datasets.train_text import main as train_text
from modus_mega.modalities.codecs import DecodeLimits, RgbCodec
from modus_mega.modalities.faults import SampleError, SkipReason
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.vocab import build_vocabulary
from tests.reliability.helpers import bench_module

npy_header_only, png_header_only, jpeg_header_only = (  # crafted headers, shared with the fault matrix's bad_shards
    getattr(bench_module("shard_cases"), name) for name in ("npy_header_only", "png_header_only", "jpeg_header_only")
)

CONFIG = synth.SynthConfig(image_size=32, feature_dim=8, feature_grid=2, rgb_format="png")


def files_of(index: int) -> dict[str, bytes]:
    return synth.sample_files(index, CONFIG)


def reason_of(files: dict[str, bytes], limits: DecodeLimits = DecodeLimits()) -> SkipReason:
    with pytest.raises(SampleError) as caught:
        decode_sample("k", files.items(), SkipCounter(), limits=limits)
    return caught.value.reason


def test_limits_default_to_the_config_defaults() -> None:
    data = DataConfig()
    assert DecodeLimits() == DecodeLimits(data.max_image_pixels, data.max_array_bytes)


@pytest.mark.parametrize("key", ["max_image_pixels", "max_array_bytes"])
def test_limits_are_range_checked(tiny_config, key: str) -> None:
    raw = config_to_dict(tiny_config)
    raw["data"][key] = 0
    with pytest.raises(ValueError, match=f"data.{key}"):
        config_from_dict(raw)


def test_npy_header_claiming_a_huge_array_is_refused_unloaded() -> None:
    files = {**files_of(0), "dinov2_local.npy": npy_header_only((200000, 200000, 64))}
    assert reason_of(files) is SkipReason.TOO_LARGE


@pytest.mark.parametrize("name", ["rgb.png", "depth.png", "normal.png", "seg.png", "canny.png"])
@pytest.mark.parametrize("side", [12000, 20000])  # 20000^2 is past PIL's own bomb error too
def test_png_header_claiming_a_huge_image_is_refused_undecoded(name: str, side: int) -> None:
    files = {**files_of(0), name: png_header_only(side, side)}
    assert reason_of(files) is SkipReason.TOO_LARGE  # a decode would say undecodable: the data is 7 bytes


def test_jpeg_header_claiming_12000_squared_is_refused_undecoded() -> None:
    assert reason_of({**without(files_of(0), "rgb."), "rgb.jpg": jpeg_header_only(12000, 12000)}) is SkipReason.TOO_LARGE


def without(files: dict[str, bytes], prefix: str) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if not name.startswith(prefix)}


def test_image_limit_is_configurable() -> None:
    files = files_of(0)
    decode_sample("k", files.items(), SkipCounter(), limits=DecodeLimits(max_image_pixels=32 * 32))
    assert reason_of(files, DecodeLimits(max_image_pixels=32 * 32 - 1)) is SkipReason.TOO_LARGE


@pytest.mark.parametrize("error, reason", [(RuntimeError("boom"), "unexpected_error"), (MemoryError(), "out_of_memory")])
def test_any_exception_skips_only_its_sample(tmp_path: Path, monkeypatch, error: BaseException, reason: str) -> None:
    path = tmp_path / "s-000000.tar"
    write_shard(path, [(synth.sample_key(i), files_of(i)) for i in range(3)])
    original = RgbCodec.decode

    def fail_on_second(self, data, fmt, what, limits):
        if synth.sample_key(1) in what:
            raise error
        return original(self, data, fmt, what, limits)

    monkeypatch.setattr(RgbCodec, "decode", fail_on_second)
    counter = SkipCounter()
    assert [s.index for s in iter_shard(path, counter)] == [0, 2]
    assert counter.skipped == {reason: 1}


def test_unknown_extension_is_counted_and_an_oversized_member_left_unread(tmp_path: Path) -> None:
    path = tmp_path / "s-000000.tar"
    samples = [(synth.sample_key(0), {**files_of(0), "rgb.exe": b"MZ"}), (synth.sample_key(1), files_of(1))]
    samples.append((synth.sample_key(2), {**without(files_of(2), "caption."), "caption.txt": b"x" * 5000}))
    write_shard(path, samples)
    counter = SkipCounter()
    read = list(iter_shard(path, counter, limits=DecodeLimits(max_array_bytes=4096)))
    assert [s.index for s in read] == [0, 1]
    assert counter.ignored_files == {"rgb.exe": 1}
    assert counter.skipped == {"too_large": 1}


def test_truncation_at_any_offset_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "s-000000.tar"
    write_shard(path, [(synth.sample_key(i), files_of(i)) for i in range(3)])
    whole = path.read_bytes()
    for cut in np.random.default_rng(0).integers(1, len(whole), size=12):
        path.write_bytes(whole[:cut])
        counter = SkipCounter()
        read = list(iter_shard(path, counter, expected_samples=3))
        assert len(read) + counter.num_skipped == 3, cut
        assert counter.skipped["truncated_tar"] >= 1, cut


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    write_shard(root / shard_name("t", 0), [(synth.sample_key(i), files_of(i)) for i in range(4)])
    write_index(root)
    train_text(["--shards", str(root), "--out", str(root / "tok"), "--vocab-size", "400"])
    return root / "tok"


def shard_source(tiny_config, shards: Path, text_tokenizer: Path) -> ShardSource:
    tiny_config.data.source, tiny_config.data.shards = "shards", str(shards)
    tiny_config.data.text_tokenizer = str(text_tokenizer)
    return ShardSource(tiny_config.data, build_vocabulary(tiny_config.model.vocab), size_multiple=16)


def test_source_skips_a_failing_sample_and_logs_ignored_files(
    tiny_config, tmp_path: Path, text_tokenizer: Path, monkeypatch
) -> None:
    from modus_mega.training.loop import SKIP_REASONS

    samples = [(synth.sample_key(i), {**files_of(i), "rgb.exe": b"MZ"}) for i in range(3)]
    write_shard(tmp_path / shard_name("s", 0), samples)
    write_index(tmp_path)
    source = shard_source(tiny_config, tmp_path, text_tokenizer)
    original = ModalityTokenizers.encode

    def fail_on_first(self, name, payload, rng):
        if name == "caption" and not source.counter.skipped.get("unexpected_error"):
            raise KeyError("a tokenizer bug")
        return original(self, name, payload, rng)

    monkeypatch.setattr(ModalityTokenizers, "encode", fail_on_first)
    read = list(source.samples(0, 0, 0))
    assert [position for position, _ in read] == [0, 1, 2]
    assert [sample is None for _, sample in read] == [True, False, False]
    assert source.counter.skipped["unexpected_error"] == 1
    assert source.counter.ignored_files["rgb.exe"] == 3  # beside the feature files that have no codebook here
    assert source.counter.skipped["ignored_files"] == sum(source.counter.ignored_files.values())
    assert "ignored_files" in SKIP_REASONS  # so the training log carries skipped/ignored_files


def test_source_of_only_broken_shards_stops_instead_of_reading_forever(
    tiny_config, tmp_path: Path, text_tokenizer: Path
) -> None:
    for index in range(2):
        (tmp_path / shard_name("bad", index)).write_bytes(b"not a tar archive at all" * 40)
    write_index(tmp_path, [(shard_name("bad", i), 3) for i in range(2)])
    source = shard_source(tiny_config, tmp_path, text_tokenizer)
    with pytest.raises(ValueError, match="in a row gave no usable sample"):
        for epoch in range(100):
            for shard in range(2):
                assert not list(source.samples(shard, 0, epoch))
    assert source.barren_reads == 4
