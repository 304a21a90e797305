"""Shard decoding, validation, skip counting, resume positions and the 2D renderings."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from modus_mega.datasets import synth
from modus_mega.modalities import MODALITY_NAMES, image_modalities, pictures
from modus_mega.modalities.faults import SampleError, SkipReason
from modus_mega.modalities.values import Detections, Groundings
from modus_mega.data.shard_format import SkipCounter
from modus_mega.data.shard_reader import decode_sample, iter_shard, prepare_sample, read_index
from modus_mega.data.shard_writer import encode_modality, write_index, write_shard

CONFIG = synth.SynthConfig(image_size=32, feature_dim=8, feature_grid=2, rgb_format="png")


def _files(index: int) -> dict[str, bytes]:
    return synth.sample_files(index, CONFIG)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _read_all(path: Path, **kwargs) -> tuple[list, SkipCounter]:
    counter = SkipCounter()
    return list(iter_shard(path, counter, **kwargs)), counter


# ----------------------------------------------------------------------------- decoding


def test_every_encoding_round_trips() -> None:
    _, _, values = synth.generate_sample(0, CONFIG)
    files: dict[str, bytes] = {}
    for name, value in values.items():
        files.update(encode_modality(name, value))
    sample = decode_sample("k", files.items(), SkipCounter())
    assert list(sample.modalities) == [n for n in MODALITY_NAMES if n in values]  # modality-table order
    assert sample.image_size == (32, 32)
    assert np.array_equal(sample.modalities["seg"], values["seg"])
    assert isinstance(sample.modalities["detection"], Detections)
    assert isinstance(sample.modalities["grounding"], Groundings)
    assert sample.modalities["grounding"].expressions == values["grounding"].expressions


def test_alternative_formats_decode() -> None:
    depth = np.array([[1.5, np.nan], [0.0, 2.25]], dtype=np.float32)
    normal = np.zeros((2, 2, 3), dtype=np.float32)
    normal[..., 2] = 2.0  # not unit: re-normalised
    normal[1, 1] = 0.0  # zero vector: invalid
    labels = np.array([[0, 300], [70000, 5]], dtype=np.int64)
    files = {
        "depth.npy": _npy(depth),
        "depth_valid.npy": _npy(np.array([[True, True], [True, False]])),
        "normal.npy": _npy(normal),
        "sam_seg.npy": _npy(labels),
        "caption.txt": " a caption \n".encode(),
        "grounding.json": json.dumps({"expression": "the thing", "box": [0, 0, 1, 2]}).encode(),
        "dinov2_local.npy": _npy(np.ones((4, 3), dtype=np.float16)),  # [gh * gw, D] square grid
        "notes.md": b"ignored",
    }
    counter = SkipCounter()
    sample = decode_sample("k", files.items(), counter)
    assert np.array_equal(sample.valid["depth"], [[True, False], [False, False]])  # NaN, 0 and mask
    assert np.array_equal(sample.modalities["depth"], [[1.5, 0.0], [0.0, 0.0]])
    assert np.array_equal(sample.valid["normal"], [[True, True], [True, False]])
    assert np.allclose(sample.modalities["normal"][0, 0], [0, 0, 1])
    assert np.array_equal(sample.modalities["sam_seg"], labels)
    assert sample.modalities["caption"] == ["a caption"]
    grounding = sample.modalities["grounding"]
    assert grounding.expressions == ["the thing"] and (grounding.width, grounding.height) == (2, 2)
    assert sample.modalities["dinov2_local"].shape == (2, 2, 3)
    assert sample.modalities["dinov2_local"].dtype == np.float32
    assert counter.ignored_files == {"notes.md": 1}


def test_sixteen_bit_label_png_and_palette_png() -> None:
    labels = np.array([[0, 1], [1000, 65535]])
    files = encode_modality("sam_seg", labels)
    assert np.array_equal(decode_sample("k", files.items(), SkipCounter()).modalities["sam_seg"], labels)
    from PIL import Image

    image = Image.fromarray(np.array([[3, 7]], dtype=np.uint8), mode="P")
    image.putpalette([i % 256 for i in range(768)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    sample = decode_sample("k", [("seg.png", buffer.getvalue())], SkipCounter())
    assert np.array_equal(sample.modalities["seg"], [[3, 7]])  # palette indices, not colours


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"rgb.png": b"\x89PNG not really"}, SkipReason.UNDECODABLE),
        ({"seg.npy": b"garbage"}, SkipReason.UNDECODABLE),
        ({"dinov2_global.npy": _npy(np.array([1.0, np.nan], dtype=np.float32))}, SkipReason.NONFINITE),
        ({"imagebind_local.npy": _npy(np.full((2, 2, 3), np.inf, dtype=np.float32))}, SkipReason.NONFINITE),
        ({"clip_global.npy": _npy(np.ones((2, 3), dtype=np.float32))}, SkipReason.BAD_SHAPE),
        ({"dinov2_local.npy": _npy(np.ones((3, 4), dtype=np.float32))}, SkipReason.BAD_SHAPE),
        ({"clip_global.npy": _npy(np.ones(3, dtype=np.int32))}, SkipReason.BAD_VALUE),
        ({"depth.npy": _npy(-np.ones((2, 2), dtype=np.float32))}, SkipReason.BAD_VALUE),
        ({"caption.json": b"[1, 2]"}, SkipReason.BAD_ANNOTATION),
        ({"caption.json": b'["", "  "]'}, SkipReason.BAD_ANNOTATION),
        ({"det.json": b"{not json"}, SkipReason.BAD_ANNOTATION),
        ({"det.json": json.dumps({"width": 4, "height": 4, "objects": [{"box": [3, 0, 1, 2], "class": "x"}]}).encode()}, SkipReason.BAD_ANNOTATION),
        ({"det.json": json.dumps({"width": 4, "height": 4, "objects": [{"box": [0, 0, 9, 2], "class": "x"}]}).encode()}, SkipReason.BAD_ANNOTATION),
        ({"det.json": json.dumps({"objects": [{"box": [0, 0, 1, 2], "class": "x"}]}).encode()}, SkipReason.BAD_ANNOTATION),
        ({"det.json": json.dumps({"width": 4, "height": 4, "objects": [{"box": [0, 0, 1, float("nan")], "class": "x"}]}).encode()}, SkipReason.NONFINITE),
        ({"notes.md": b"x"}, SkipReason.NO_USABLE_MODALITY),
        ({}, SkipReason.NO_USABLE_MODALITY),
    ],
)
def test_bad_files_raise_with_their_reason(files: dict[str, bytes], reason: SkipReason) -> None:
    with pytest.raises(SampleError) as info:
        decode_sample("bad", files.items(), SkipCounter())
    assert info.value.reason == reason


def test_truncated_jpeg_duplicates_and_size_mismatch() -> None:
    files = _files(0)
    without_rgb = {k: v for k, v in files.items() if k != "rgb.png"}
    jpeg = encode_modality("rgb", synth.generate_sample(0, CONFIG)[2]["rgb"], image_format="jpg")["rgb.jpg"]
    det = json.loads(files["det.json"])
    det["width"] = 64
    cases = [
        (SkipReason.UNDECODABLE, {**without_rgb, "rgb.jpg": jpeg[: len(jpeg) // 2]}),
        (SkipReason.DUPLICATE_FILE, {**files, "rgb.jpg": jpeg}),
        (SkipReason.SIZE_MISMATCH, {**files, "depth.png": _files_at(16)["depth.png"]}),
        (SkipReason.SIZE_MISMATCH, {**files, "det.json": json.dumps(det).encode()}),
    ]
    assert decode_sample("good", {**without_rgb, "rgb.jpg": jpeg}.items(), SkipCounter()).image_size == (32, 32)
    for reason, sample_files in cases:
        with pytest.raises(SampleError) as info:
            decode_sample("bad", sample_files.items(), SkipCounter())
        assert info.value.reason == reason, reason


def _files_at(size: int) -> dict[str, bytes]:
    return synth.sample_files(0, synth.SynthConfig(image_size=size, feature_dim=8, feature_grid=2))


# ----------------------------------------------------------------------------- shards


def _good_shard(path: Path, count: int, first: int = 0) -> Path:
    write_shard(path, [(synth.sample_key(i), _files(i)) for i in range(first, first + count)])
    return path


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    good = [(synth.sample_key(i), _files(i)) for i in range(3)]
    bad = [
        ("undecodable", {**_files(3), "rgb.png": b"\x89PNG\r\n\x1a\n broken"}),
        ("mismatch", {**_files(4), "depth.png": _files_at(16)["depth.png"]}),
        ("nan", {**_files(5), "clip_global.npy": _npy(np.array([np.nan, 1.0], np.float32))}),
        ("nothing", {"readme.txt": b"no modality here"}),
    ]
    path = tmp_path / "mixed-000000.tar"
    write_shard(path, [good[0], bad[0], good[1], bad[1], bad[2], bad[3], good[2]])
    samples, counter = _read_all(path, expected_samples=7)
    assert [s.key for s in samples] == [k for k, _ in good]
    assert [s.index for s in samples] == [0, 2, 6]
    assert counter.samples_ok == 3
    assert dict(counter.skipped) == {
        "undecodable": 1,
        "size_mismatch": 1,
        "nonfinite": 1,
        "no_usable_modality": 1,
    }
    assert counter.ignored_files == {"readme.txt": 1}
    assert not counter.failed_shards


def _member_ends(path: Path) -> list[tuple[str, int]]:
    """(member name, byte offset where its padded data ends)."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]


def test_truncated_inside_a_member(tmp_path: Path) -> None:
    path = _good_shard(tmp_path / "t-000000.tar", 3)
    ends = _member_ends(path)
    first_of_third = next(i for i, (name, _) in enumerate(ends) if name.startswith(synth.sample_key(2)))
    cut = ends[first_of_third][1] - 100  # inside the third sample's first member
    path.write_bytes(path.read_bytes()[:cut])
    samples, counter = _read_all(path, expected_samples=3)
    assert [s.index for s in samples] == [0, 1]
    assert counter.skipped == {"truncated_tar": 1}


def test_truncated_between_members_of_a_sample(tmp_path: Path) -> None:
    # The dangerous case: tarfile ends silently, and the last sample looks complete but
    # lacks files. It must be dropped, not yielded with modalities missing.
    path = _good_shard(tmp_path / "t-000000.tar", 3)
    ends = _member_ends(path)
    second = [end for name, end in ends if name.startswith(synth.sample_key(1))]
    path.write_bytes(path.read_bytes()[: second[2]])  # after its third file
    samples, counter = _read_all(path, expected_samples=3)
    assert [s.index for s in samples] == [0]
    assert counter.skipped == {"truncated_tar": 2}
    samples, counter = _read_all(path)  # without the index: at least the held-back sample
    assert [s.index for s in samples] == [0] and counter.skipped == {"truncated_tar": 1}


def test_shard_with_fewer_samples_than_indexed(tmp_path: Path) -> None:
    path = _good_shard(tmp_path / "t-000000.tar", 2)
    samples, counter = _read_all(path, expected_samples=5)
    assert len(samples) == 2 and counter.skipped == {"truncated_tar": 3}


@pytest.mark.parametrize("content", [None, b"", b"this is not a tar file at all" * 40])
def test_unreadable_shard_is_named(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken-000000.tar"
    if content is not None:
        path.write_bytes(content)
    samples, counter = _read_all(path, expected_samples=2)
    assert samples == []
    assert counter.failed_shards == [str(path)]
    assert counter.skipped == {"truncated_tar": 2}
    assert str(path) in counter.summary()


def test_resume_from_a_position(tmp_path: Path) -> None:
    path = tmp_path / "r-000000.tar"
    write_shard(path, [(synth.sample_key(0), _files(0)), ("bad", {"x.y": b""}), *[(synth.sample_key(i), _files(i)) for i in range(2, 5)]])
    full, _ = _read_all(path)
    for start in range(6):
        tail, counter = _read_all(path, start=start)
        assert [s.index for s in tail] == [s.index for s in full if s.index >= start]
        assert counter.num_skipped == (1 if start <= 1 else 0)
        assert not counter.failed_shards


def test_counters_merge() -> None:
    a, b = SkipCounter(samples_ok=2), SkipCounter(samples_ok=1)
    a.skip(SkipReason.NONFINITE, "x")
    b.skip(SkipReason.NONFINITE, "y")
    b.skip(SkipReason.UNDECODABLE, "z")
    b.failed_shards.append("s.tar")
    a.merge(b)
    assert a.as_dict() == {
        "samples_ok": 3,
        "skipped": {"nonfinite": 2, "undecodable": 1},
        "ignored_files": {},
        "failed_shards": ["s.tar"],
    }


def test_index_round_trip(tmp_path: Path) -> None:
    _good_shard(tmp_path / "d-000000.tar", 2)
    _good_shard(tmp_path / "d-000001.tar", 1, first=2)
    with pytest.raises(ValueError, match="index.json"):
        read_index(tmp_path)
    write_index(tmp_path)  # scans the shards
    shards = read_index(tmp_path)
    assert [(s.path.name, s.num_samples) for s in shards] == [("d-000000.tar", 2), ("d-000001.tar", 1)]


# ----------------------------------------------------------------------------- rendering


def test_prepare_sample_renders_every_2d_modality() -> None:
    sample = decode_sample("k", _files(1).items(), SkipCounter())
    prepared = prepare_sample(sample)
    assert sorted(prepared.images) == sorted(image_modalities())
    for name, image in prepared.images.items():
        assert image.shape == (3, 32, 32) and image.dtype == np.float32, name
        assert image.min() >= -1.0 and image.max() <= 1.0, name
    assert set(prepared.payloads) == set(sample.modalities) - set(prepared.images)
    assert np.array_equal(prepared.images["normal"][0], sample.modalities["normal"][..., 0])  # channel 0 = n_x


def test_render_inverses() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 40, size=(8, 9))
    assert np.array_equal(pictures.image_to_labels(pictures.labels_to_image(labels), 40), labels)
    assert len({tuple(c) for c in pictures.palette(256)}) == 256  # distinct colours
    edges = rng.random((5, 6)) > 0.5
    assert np.array_equal(pictures.image_to_edges(pictures.edges_to_image(edges)), edges)
    normal = rng.normal(size=(4, 5, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    assert np.allclose(pictures.image_to_normal(pictures.normal_to_image(normal)), normal, atol=1e-6)
    rgb = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    assert np.array_equal(pictures.image_to_rgb(pictures.rgb_to_image(rgb)), rgb)


def test_depth_rendering() -> None:
    depth = np.array([[1.0, 2.0], [4.0, 0.0]], dtype=np.float32)
    image = pictures.depth_to_image(depth)
    assert np.allclose(image[0], [[-1.0, 0.0], [1.0, 1.0]])  # log scale; invalid -> far (+1)
    assert np.array_equal(image[0], image[2])
    near, far = pictures.depth_range(depth)
    assert (near, far) == (1.0, 4.0)
    assert np.allclose(pictures.image_to_depth(image, near, far)[:, 0], [1.0, 4.0])
    assert np.allclose(pictures.image_to_depth(image, near, far)[0, 1], 2.0)
    with pytest.raises(ValueError, match="near"):
        pictures.depth_to_image(depth, near=3.0, far=1.0)
