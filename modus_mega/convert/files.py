"""Writing checkpoints: streamed safetensors files, shard plans, atomic output directories.

A safetensors file is an 8-byte little-endian header length, a JSON header giving every
tensor's dtype, shape and byte range, then the raw bytes. The header depends only on
names, shapes and dtypes, so ``write_safetensors`` writes it first and then streams each
tensor's bytes as the tensor is produced: memory holds one tensor, never a whole shard.
Files it writes load with ``safetensors.safe_open`` and ``transformers``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from modus_mega.convert.source import DTYPE_CODES
from modus_mega.modalities import feature_modalities

# Tokenizer files of a Qwen2 / Hugging Face tokenizer; those present are copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)
CODEBOOK_SUMMARY = "vq.json"  # what train_vq writes next to the codebooks (sizes, errors)
_HEADER_ALIGN = 8  # the header is space-padded so tensor data starts 8-byte aligned (as safetensors does)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file: its name there, its source name, shape and output dtype."""

    name: str  # name inside the output file
    source_name: str  # MODUS name in the source
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of its data in the file."""
        return self.shape.numel() * self.dtype.itemsize


def plan_shards(plan: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Split ``plan`` in order into shards of at most ``max_bytes`` of data each.

    A tensor larger than ``max_bytes`` gets a shard of its own (as Hugging Face does).
    """
    if max_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_bytes} bytes")
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards if shards[0] else []


def _header(plan: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for item in plan:
        if item.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {item.name!r} has dtype {item.dtype}, which safetensors cannot store")
        end = offset + item.nbytes
        header[item.name] = {"dtype": DTYPE_CODES[item.dtype], "shape": list(item.shape), "data_offsets": [offset, end]}
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % _HEADER_ALIGN)


def write_safetensors(
    path: Path,
    plan: Sequence[PlannedTensor],
    produce: Callable[[PlannedTensor], Tensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], object] | None = None,
) -> None:
    """Write ``plan``'s tensors to ``path``, calling ``produce`` for one tensor at a time.

    ``produce`` must return a tensor of exactly the planned shape and dtype (checked);
    ``on_bytes`` is told how many bytes each tensor added (progress bars).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; writing from a big-endian host is not supported")
    names = [item.name for item in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in the plan for {path}")
    header = _header(plan, metadata or {"format": "pt"})
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for item in plan:
            tensor = produce(item)
            if tensor.shape != item.shape or tensor.dtype != item.dtype:
                raise ValueError(
                    f"{item.source_name!r} produced shape {list(tensor.shape)} {tensor.dtype}, but the plan for {path} "
                    f"says {list(item.shape)} {item.dtype}; the source changed while converting"
                )
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
            f.write(memoryview(data.numpy()))
            del tensor, data
            if on_bytes is not None:
                on_bytes(item.nbytes)
        f.flush()
        os.fsync(f.fileno())


def progress_bar(total_bytes: int, desc: str, enabled: bool) -> tqdm:
    """A byte-counting progress bar (no output when disabled)."""
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` in ``dtype`` if ``dtype`` is given (an explicit request, integer tensors too); else unchanged."""
    return tensor.to(dtype) if dtype is not None else tensor


def output_dtype(dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The stored dtype of a tensor of ``dtype`` under ``cast(.., requested)``."""
    return requested if requested is not None else dtype


def nonfinite_fix(allow_nonfinite: bool) -> str | None:
    """The fix a non-finite tensor's refusal names, or None when ``--allow-nonfinite`` lets it through."""
    return None if allow_nonfinite else "the checkpoint is damaged: use an intact copy, or pass --allow-nonfinite"


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    """Read the JSON object in ``path``; ``what`` says what it is, for the error message."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; {what} is missing from the checkpoint") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} ({what}) is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) must hold a JSON object, got {type(data).__name__}")
    return data


def copy_tokenizer_files(src_dir: Path | None, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files present in ``src_dir`` into ``dst_dir``; returns their names."""
    if src_dir is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, dst_dir / name)
            copied.append(name)
    return copied


def copy_codebooks(src_dir: Path | None, dst_dir: Path) -> list[str]:
    """Copy the feature codebooks in ``src_dir`` (``{modality}.safetensors``, and ``vq.json``) into ``dst_dir``.

    ``dst_dir`` is created only when there is something to copy; returns the names copied.
    """
    if src_dir is None:
        return []
    names = [f"{m}.safetensors" for m in feature_modalities()] + [CODEBOOK_SUMMARY]
    present = [name for name in names if (Path(src_dir) / name).is_file()]
    if present:
        dst_dir.mkdir(parents=True, exist_ok=True)
    for name in present:
        shutil.copyfile(Path(src_dir) / name, dst_dir / name)
    return present


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` only if the block succeeds.

    The temporary directory sits next to ``out`` (same file system, so the final rename
    is atomic) and is removed on any error: there is never a half-written ``out``.
    An existing ``out`` is refused unless ``overwrite``, in which case it is replaced
    only after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"output {out} already exists; choose another path or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000`` (decimal units, as Hugging Face)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"size {text!r} is not of the form 5GB, 500MB, 2GiB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
