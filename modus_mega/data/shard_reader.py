"""Reading MODUS shards: tar members -> samples -> decoded, validated ``RawSample``s.

Bad input never crashes a reader and never yields a silently wrong array: a sample with a
truncated member, an undecodable file, modalities of mismatched size, non-finite features,
a malformed annotation or no usable modality is skipped, counted by reason in a
``SkipCounter`` and logged at debug level; a shard that yields nothing is named in the log.

The module is loader-agnostic: ``iter_shard`` reads one shard from a sample offset (for exact
resume), and ``prepare_sample`` turns a decoded ``RawSample`` into model-ready 2D images and
raw 1D payloads. Splitting shards across ranks and workers is the loader's job. How each
modality's files decode is its codec in the modality table.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modus_mega.data.shard_format import (
    DEPTH_VALID_CODEC,
    DEPTH_VALID_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILENAME,
    PreparedSample,
    RawSample,
    SkipCounter,
    in_table_order,
)
from modus_mega.modalities import modality, modality_of_file_key, to_image
from modus_mega.modalities.codecs import Decoded, DecodeLimits
from modus_mega.modalities.faults import SampleError, SkipReason
from modus_mega.modalities.values import Payload

logger = logging.getLogger(__name__)


def prepare_sample(sample: RawSample) -> PreparedSample:
    """Render every 2D modality to a 3-channel image in [-1, 1]; pass 1D payloads through."""
    images: dict[str, np.ndarray] = {}
    payloads: dict[str, Payload] = {}
    for name, value in sample.modalities.items():
        if modality(name).family == "2d":
            assert isinstance(value, np.ndarray)
            images[name] = to_image(name, value, sample.valid.get(name))
        else:
            payloads[name] = value
    return PreparedSample(key=sample.key, images=images, payloads=payloads)


# ----------------------------------------------------------------------------- decoding


def _split_name(file_name: str) -> tuple[str, str]:
    """``'rgb.jpg'`` -> ``('rgb', 'jpg')``; the file key is everything before the last dot."""
    stem, _, fmt = file_name.rpartition(".")
    return stem, fmt.lower()


class UnreadMember(bytes):
    """Stands in for a tar member larger than ``limits.max_array_bytes``, skipped without reading it."""


def decode_sample(
    key: str,
    files: Iterable[tuple[str, bytes]],
    counter: SkipCounter,
    shard: str = "",
    index: int = 0,
    limits: DecodeLimits = DecodeLimits(),
) -> RawSample:
    """Decode and validate one sample's files, ``[('rgb.jpg', b'...'), ...]`` (or ``dict.items()``).

    Unknown file keys are ignored and counted in ``counter.ignored_files``. Raises
    ``SampleError`` (with its ``SkipReason``) if any file is bad or larger than ``limits``, if
    the 2D modalities or the box annotations disagree on the image size, or if no modality is
    usable.
    """
    decoded: dict[str, Decoded] = {}
    depth_valid: np.ndarray | None = None
    seen: dict[str, str] = {}
    files = sorted(files)
    for file_name, data in files:
        file_key, fmt = _split_name(file_name)
        what = f"{shard or '<memory>'}:{key}.{file_name}"
        row = modality_of_file_key(file_key)
        codec = DEPTH_VALID_CODEC if file_key == DEPTH_VALID_KEY else (row.codec if row is not None else None)
        if codec is None or fmt not in codec.formats:
            counter.ignored_files[file_name] += 1
            continue
        if file_key in seen:
            raise SampleError(SkipReason.DUPLICATE_FILE, f"{what}: {file_key} also stored as {seen[file_key]}")
        seen[file_key] = file_name
        if isinstance(data, UnreadMember):
            limit = limits.max_array_bytes
            raise SampleError(SkipReason.TOO_LARGE, f"{what}: member larger than data.max_array_bytes={limit}")
        if row is None:
            depth_valid = np.asarray(codec.decode(data, fmt, what, limits).value)
        else:
            decoded[row.name] = codec.decode(data, fmt, what, limits)

    where = f"{shard or '<memory>'}:{key}"
    modalities = {name: d.value for name, d in decoded.items() if not modality(name).codec.needs_image_size}
    valid = {name: d.valid for name, d in decoded.items() if d.valid is not None}
    sizes = {n: tuple(v.shape[:2]) for n, v in modalities.items() if modality(n).family == "2d"}  # type: ignore[union-attr]
    if depth_valid is not None:
        if "depth" not in modalities:
            raise SampleError(SkipReason.BAD_ANNOTATION, f"{where}: {DEPTH_VALID_KEY} without depth")
        sizes[DEPTH_VALID_KEY] = depth_valid.shape
        valid["depth"] = valid["depth"] & depth_valid
        modalities["depth"] = np.where(valid["depth"], modalities["depth"], 0.0).astype(np.float32)  # type: ignore[arg-type]
    annotations = {name: d for name, d in decoded.items() if modality(name).codec.needs_image_size}
    for name, annotation in annotations.items():
        if annotation.declared_size is not None:
            sizes[name] = annotation.declared_size
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n}={s[0]}x{s[1]}" for n, s in sizes.items())
        raise SampleError(SkipReason.SIZE_MISMATCH, f"{where}: modalities disagree on H x W ({listing})")
    image_size = next(iter(sizes.values()), None)
    for name, annotation in annotations.items():
        row = modality(name)
        if image_size is None:
            raise SampleError(
                SkipReason.BAD_ANNOTATION,
                f"{where}: {row.file_key}.json has no width/height and the sample has no 2D modality to take it from",
            )
        modalities[name] = row.codec.place(annotation.value, image_size[0], image_size[1], f"{where}: {name}")
    if not modalities:
        names = ", ".join(name for name, _ in files) or "no files"
        raise SampleError(SkipReason.NO_USABLE_MODALITY, f"{where}: no usable modality ({names})")
    return RawSample(key=key, shard=shard, index=index, modalities=in_table_order(modalities), valid=valid)


# ----------------------------------------------------------------------------- reading shards
def _group_members(tar: tarfile.TarFile, max_bytes: int | None = None) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Consecutive members sharing a key form one sample (the webdataset convention).

    A group is yielded when the next key starts, or when the archive ends; a tar that breaks
    inside a member raises ``tarfile.ReadError`` and that partial group is never yielded. A
    member larger than ``max_bytes`` is not read: an ``UnreadMember`` stands in for it.
    """
    key: str | None = None
    files: list[tuple[str, bytes]] = []
    for member in tar:
        if not member.isfile():
            continue
        directory, _, base = member.name.rpartition("/")
        stem, dot, suffix = base.partition(".")
        if not dot:
            continue  # a file without a modality suffix carries nothing MODUS reads
        member_key = f"{directory}/{stem}" if directory else stem
        if member_key != key and key is not None:
            yield key, files
            files = []
        key = member_key
        if max_bytes is not None and member.size > max_bytes:
            files.append((suffix, UnreadMember()))
            continue
        extracted = tar.extractfile(member)
        assert extracted is not None
        files.append((suffix, extracted.read()))
    if key is not None:
        yield key, files


def iter_shard(
    path: str | os.PathLike[str],
    counter: SkipCounter,
    start: int = 0,
    expected_samples: int | None = None,
    limits: DecodeLimits = DecodeLimits(),
) -> Iterator[RawSample]:
    """Yield the valid samples of one ``.tar`` shard, from sample position ``start`` on.

    Every sample position counts, skipped samples included, so a loader resumes exactly by
    passing ``start = last_yielded.index + 1``. Skipped samples go to ``counter``. A shard that
    is missing, breaks inside a member, or ends without the tar end-of-archive marker loses
    the samples from the break on, counted as ``truncated_tar`` (the last sample before a
    missing marker is held back until the marker is checked, since it may lack files). With
    ``expected_samples`` (from the index) every promised sample that is absent is counted. A
    shard that yields nothing is named in the log and in ``counter.failed_shards``. Any
    exception from one sample (``MemoryError`` included) skips that sample only, counted by
    reason; files are checked against ``limits`` from their headers before anything is allocated.
    """
    shard = os.fspath(path)
    position = 0  # index of the next sample group
    yielded = 0
    complete = False
    pending: tuple[str, list[tuple[str, bytes]]] | None = None

    def emit(group: tuple[str, list[tuple[str, bytes]]]) -> Iterator[RawSample]:
        """Decode the complete sample group at ``position``; yield it unless it is skipped."""
        nonlocal position, yielded
        sample = _decode_or_count(group, counter, shard, position, start, limits)
        position += 1
        if sample is not None:
            yielded += 1
            yield sample

    try:
        with open(shard, "rb") as handle:
            with tarfile.open(fileobj=handle, mode="r|") as tar:
                for group in _group_members(tar, limits.max_array_bytes):
                    if pending is not None:
                        yield from emit(pending)
                    pending = group
                end_offset = tar.offset
            handle.seek(end_offset)
            tail = handle.read(2 * tarfile.BLOCKSIZE)
        # A complete tar ends with two zero blocks; tarfile stops silently without them.
        complete = len(tail) == 2 * tarfile.BLOCKSIZE and not any(tail)
        if not complete:
            logger.warning("shard %s lacks the tar end-of-archive marker: truncated", shard)
    except Exception as err:  # a broken or hostile archive loses its tail, never the job
        # The group in flight is partial and never came out; `pending` is complete.
        logger.warning("shard %s breaks after %d samples: %s", shard, position + (pending is not None), err)
        if pending is not None:
            yield from emit(pending)
            pending = None
    if complete and pending is not None:
        yield from emit(pending)
    lost_until = max(expected_samples or 0, position + (0 if complete else 1))
    for index in range(max(position, start), lost_until):
        counter.skip(SkipReason.TRUNCATED_TAR, f"{shard}: sample {index} missing (shard holds {position})")
    if yielded == 0 and start == 0:
        if shard not in counter.failed_shards:
            counter.failed_shards.append(shard)
        logger.warning("shard %s yielded no usable sample (%s)", shard, counter.summary())


def _decode_or_count(
    group: tuple[str, list[tuple[str, bytes]]],
    counter: SkipCounter,
    shard: str,
    index: int,
    start: int,
    limits: DecodeLimits,
) -> RawSample | None:
    """Decode one sample group at shard position ``index``; None if before ``start`` or skipped.

    Whatever goes wrong with one sample skips that sample: a ``SampleError`` under its reason,
    ``MemoryError`` as ``out_of_memory``, anything else as ``unexpected_error``.
    """
    if index < start:
        return None
    key, files = group
    try:
        sample = decode_sample(key, files, counter, shard=shard, index=index, limits=limits)
    except SampleError as err:
        counter.skip(err.reason, str(err))
        return None
    except MemoryError as err:
        counter.skip(SkipReason.OUT_OF_MEMORY, f"{shard}:{key}: MemoryError {err}")
        return None
    except Exception as err:  # noqa: BLE001 - one bad sample must never end the job
        counter.skip(SkipReason.UNEXPECTED_ERROR, f"{shard}:{key}: {type(err).__name__}: {err}")
        return None
    counter.samples_ok += 1
    return sample


def read_sample_files(tar_path: str | os.PathLike[str]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """The raw ``(key, [(file name, bytes)])`` groups of a shard, undecoded (tools and tests)."""
    with tarfile.open(os.fspath(tar_path), mode="r|") as tar:
        yield from _group_members(tar)


# ----------------------------------------------------------------------------- index


@dataclass(frozen=True)
class ShardInfo:
    """One shard listed in a dataset index."""

    path: Path  # absolute path of the .tar file
    num_samples: int  # samples stored in it (before any skipping)


def read_index(directory: str | os.PathLike[str]) -> list[ShardInfo]:
    """The shards of a dataset directory, from its ``index.json``."""
    root = Path(directory)
    index_path = root / INDEX_FILENAME
    if not index_path.is_file():
        raise ValueError(
            f"{index_path} not found; write it with modus_mega.data.shard_writer.write_index({str(root)!r}) "
            "or generate data with `python -m modus_mega.datasets.synth --out DIR`"
        )
    raw = json.loads(index_path.read_text())
    if raw.get("format") != FORMAT_NAME or raw.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{index_path}: format {raw.get('format')!r} v{raw.get('version')} is not {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return [ShardInfo(path=(root / s["name"]).resolve(), num_samples=int(s["num_samples"])) for s in raw["shards"]]


