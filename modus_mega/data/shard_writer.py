"""Writing MODUS shards: values -> files (each modality's codec) -> deterministic tar + index.

The inverse of ``shard_reader.py``, used by the offline dataset builders and by tests.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modus_mega.data.shard_format import FORMAT_NAME, FORMAT_VERSION, INDEX_FILENAME
from modus_mega.data.shard_reader import read_sample_files
from modus_mega.modalities import modality
from modus_mega.modalities.codecs import EncodeOptions
from modus_mega.modalities.values import Payload


def encode_modality(
    name: str,
    value: Payload,
    *,
    image_format: str = "png",
    feature_dtype: np.dtype | type = np.float32,
    jpeg_quality: int = 95,
    float_maps_as_npy: bool = False,
) -> dict[str, bytes]:
    """Encode one decoded modality value into its shard files (``{'rgb.jpg': bytes}``).

    The inverse of the decoders, using the first accepted format of each modality's codec,
    except rgb (``image_format``: png or jpg). Depth is written as 16-bit millimetres (float32
    ``.npy`` metres with ``float_maps_as_npy``) with 0 = invalid, so pass depth that is 0 where invalid.
    """
    row = modality(name)
    options = EncodeOptions(image_format, feature_dtype, jpeg_quality, float_maps_as_npy)
    return {f"{row.file_key}.{ext}": data for ext, data in row.codec.encode(value, options).items()}


def write_shard(path: str | os.PathLike[str], samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write ``(key, {file name: bytes})`` samples into a tar, atomically; returns the count.

    Members carry fixed metadata (mtime 0, uid 0, mode 0644) so equal inputs give equal bytes.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    count = 0
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            if "." in key.rpartition("/")[2]:
                raise ValueError(f"sample key {key!r} contains a dot; webdataset keys end at the first dot")
            for file_name in sorted(files):
                data = files[file_name]
                info = tarfile.TarInfo(f"{key}.{file_name}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(tmp, target)
    return count


def write_index(
    directory: str | os.PathLike[str],
    shards: Iterable[tuple[str, int]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``index.json`` listing ``(shard file name, num_samples)``; scans ``*.tar`` if None."""
    root = Path(directory)
    if shards is None:
        shards = [(p.name, sum(1 for _ in read_sample_files(p))) for p in sorted(root.glob("*.tar"))]
    listing = [{"name": name, "num_samples": int(n)} for name, n in shards]
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_samples": sum(s["num_samples"] for s in listing),
        "shards": listing,
        **(dict(extra) if extra else {}),
    }
    path = root / INDEX_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


