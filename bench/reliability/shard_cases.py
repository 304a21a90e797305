"""The ``bad_shards`` row of the fault matrix (``bench/reliability/faults.py``): one bad member among good ones.

Each case writes a small dataset (3 shards of 4 synthetic samples, 32 px) with one fault
in one sample of the middle shard, reads every shard the way the training loader does
(``shard_reader.iter_shard`` over ``read_index``, with the run's ``DecodeLimits``), and is
*held* when the read raised nothing, the bad sample was counted under the expected reason,
and every good sample was delivered (a truncated shard loses the samples from the cut on,
each counted as ``truncated_tar``: delivered + skipped must still be every sample).

Cases: an ``.npy`` header claiming (200000, 200000, 64); PNG and JPEG headers claiming
12000 x 12000 (below PIL's own bomb limit); a member with an unknown extension
(``rgb.exe``: the sample is delivered, the file counted in ``ignored_files``); a member larger
than ``data.max_array_bytes``; and, ``count`` times each, the middle shard truncated at a
random offset, a random image or array member replaced by random bytes, and a random
exception raised inside a decoder (``MemoryError`` is ``out_of_memory``, any other
``unexpected_error``).
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

import modus_mega.modalities.codecs as codecs
from modus_mega.data.shard_format import SkipCounter, shard_name
from modus_mega.data.shard_reader import iter_shard, read_index
from modus_mega.data.shard_writer import write_index, write_shard
from modus_mega.datasets import synth
from modus_mega.modalities.codecs import DecodeLimits
from modus_mega.modalities.faults import SkipReason

SYNTH = synth.SynthConfig(image_size=32, feature_dim=8, feature_grid=2, rgb_format="png")
SHARDS, PER_SHARD = 3, 4
BAD_SHARD, BAD_SAMPLE = 1, 2  # the sample every member fault lands in: shard 1, its third sample
LIMITS = DecodeLimits(max_array_bytes=4096)  # every good member is smaller; the oversized case is larger
Files = dict[str, bytes]


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """A .npy whose header claims ``shape`` float32, followed by a few bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\0" * 16


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` 8-bit RGB, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7)) + chunk(b"IEND", b"")


def jpeg_header_only(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(cv2.imencode(".jpg", np.zeros((32, 32, 3), np.uint8))[1].tobytes())
    frame = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[frame + 5 : frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _samples() -> list[list[tuple[str, Files]]]:
    """The good dataset: ``SHARDS`` lists of ``PER_SHARD`` (key, files)."""
    return [
        [(synth.sample_key(i), synth.sample_files(i, SYNTH)) for i in range(s * PER_SHARD, (s + 1) * PER_SHARD)]
        for s in range(SHARDS)
    ]


def _read(root: Path) -> tuple[list[str], SkipCounter]:
    """Every sample key the loader's reader delivers from ``root``, and what it skipped."""
    counter, keys = SkipCounter(), []
    for shard in read_index(root):
        keys += [sample.key for sample in iter_shard(shard.path, counter, expected_samples=shard.num_samples, limits=LIMITS)]
    return keys, counter


def _held(
    work: Path, edit: Callable[[Files], Files] | None, reason: SkipReason, truncate_at: float | None = None
) -> tuple[bool, str]:
    """Write the dataset with the bad sample's files passed through ``edit`` (or the middle shard cut at the
    fraction ``truncate_at``), read it, and check the outcome."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shards = _samples()
    good = [key for shard in shards for key, _ in shard]
    if edit is not None:
        key, files = shards[BAD_SHARD][BAD_SAMPLE]
        shards[BAD_SHARD][BAD_SAMPLE] = (key, edit(dict(files)))
    for s, samples in enumerate(shards):
        write_shard(work / shard_name("bad", s), samples)
    write_index(work, [(shard_name("bad", s), PER_SHARD) for s in range(SHARDS)])
    if truncate_at is not None:
        path = work / shard_name("bad", BAD_SHARD)
        data = path.read_bytes()
        path.write_bytes(data[: max(1, int(len(data) * truncate_at))])
    try:
        keys, counter = _read(work)
    except Exception as error:  # the fault escaped the reader: not held
        return False, f"the reader raised {type(error).__name__}: {error}"
    summary = f"delivered {len(keys)}/{len(good)}, {counter.summary()}"
    if truncate_at is not None:  # the cut shard loses its samples from the cut on, each counted; the rest all arrive
        lost = [key for key in good if key not in keys]
        others = all(key in keys for key, _ in shards[0] + shards[2])
        counted = counter.skipped == ({reason.value: len(lost)} if lost else {})
        return keys == [k for k in good if k not in lost] and others and counted, summary
    if reason is SkipReason.IGNORED_FILES:
        return keys == good and counter.ignored_files == {"rgb.exe": 1} and not counter.skipped, summary
    expected = [k for k in good if k != shards[BAD_SHARD][BAD_SAMPLE][0]]
    return keys == expected and counter.skipped == {reason.value: 1}, summary


@contextlib.contextmanager
def _failing(decoder: str, bad_key: str, error: BaseException) -> Iterator[None]:
    """``codecs.<decoder>`` raises ``error`` for the bad sample's files (``what`` names the sample)."""
    original = getattr(codecs, decoder)

    def failing(data: bytes, what: str, limits: DecodeLimits) -> object:
        if bad_key in what:
            raise error
        return original(data, what, limits)

    setattr(codecs, decoder, failing)
    try:
        yield
    finally:
        setattr(codecs, decoder, original)


def shard_cases(work: Path, rng: random.Random, count: int) -> Iterator[tuple[str, Callable[[], tuple[bool, str]]]]:
    """Every bad-shard case as (name, check); the random kinds ``count`` times each."""
    attempt = work / "dataset"

    def member(name: str, data: bytes, drop: str | None = None) -> Callable[[Files], Files]:
        return lambda files: {**{k: v for k, v in files.items() if k != drop}, name: data}

    too_large = SkipReason.TOO_LARGE
    yield "npy header claiming (200000, 200000, 64)", lambda: _held(
        attempt, member("dinov2_local.npy", npy_header_only((200000, 200000, 64))), too_large)
    for name in ("rgb.png", "depth.png", "normal.png", "seg.png", "canny.png"):
        yield f"{name} header claiming 12000 x 12000", lambda n=name: _held(
            attempt, member(n, png_header_only(12000, 12000)), too_large)
    yield "rgb.jpg header claiming 12000 x 12000", lambda: _held(
        attempt, member("rgb.jpg", jpeg_header_only(12000, 12000), drop="rgb.png"), too_large)
    yield "unknown member rgb.exe", lambda: _held(attempt, member("rgb.exe", b"MZ"), SkipReason.IGNORED_FILES)
    yield "caption.json over max_array_bytes", lambda: _held(
        attempt, member("caption.json", b" " * (LIMITS.max_array_bytes + 1)), too_large)  # fmt: skip
    binary = [name for name in synth.sample_files(0, SYNTH) if name.endswith((".png", ".npy"))]
    bad_key = synth.sample_key(BAD_SHARD * PER_SHARD + BAD_SAMPLE)
    for _ in range(count):
        cut = rng.random()
        yield f"middle shard truncated at {cut:.4f} of its bytes", lambda c=cut: _held(
            attempt, None, SkipReason.TRUNCATED_TAR, truncate_at=c)
        name, junk = rng.choice(binary), rng.randbytes(rng.randrange(1, 512))
        yield f"{name} replaced by {len(junk)} random bytes", lambda n=name, j=junk: _held(
            attempt, member(n, j), SkipReason.UNDECODABLE)
        decoder = rng.choice(["decode_pil", "decode_npy"])
        error = rng.choice([RuntimeError("boom"), MemoryError(), KeyError("k"), ZeroDivisionError(), struct.error("x")])
        reason = SkipReason.OUT_OF_MEMORY if isinstance(error, MemoryError) else SkipReason.UNEXPECTED_ERROR

        def raising(d: str = decoder, e: BaseException = error, r: SkipReason = reason) -> tuple[bool, str]:
            with _failing(d, bad_key, e):
                return _held(attempt, None, r)

        yield f"{type(error).__name__} inside {decoder}", raising
