"""A command line's conditions and targets as a checked generation request.

Conditions are ``NAME=VALUE``:

- a 2D modality's VALUE is a file read exactly as training reads a shard member: the
  modality's codec decodes it (a depth PNG is 16-bit millimetres, a label map a
  single-channel id image, normals an RGB mapping: ``modalities/codecs.py``), then its
  ``to_image`` makes the model image. The image must already be the generation size
  (``--size``): it is refused, not resized, since resizing a label or depth map silently
  changes it; the message names both sizes.
- ``caption``'s VALUE is the text itself; any other 1D modality's VALUE is a file in one of
  its codec's formats (``.json`` boxes, ``.npy`` features), tokenized as in training.

Every problem is one ``ValueError`` whose message names the flag and the fix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modus_mega.data.documents import Sample
from modus_mega.modalities import modality, to_image
from modus_mega.modalities.codecs import DecodeLimits
from modus_mega.modalities.values import Payload
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.vq import FeatureQuantizer

TEXT_VALUES = ("caption",)  # 1D conditions given as text on the command line rather than as a file
NEEDS_TEXT_TOKENIZER = ("text", "detections", "groundings")  # tokenizer kinds that read or write text


def read_conditions(
    specs: list[str], size: tuple[int, int], tokenizers: ModalityTokenizers | None
) -> tuple[Sample, list[str]]:
    """The conditions of ``specs`` (``NAME=VALUE`` each) as a ``Sample`` and their order."""
    sample = Sample(key="request")
    order: list[str] = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not value:
            raise ValueError(f"--cond {spec!r}: expected NAME=VALUE, e.g. --cond rgb=photo.png or --cond caption=\"a red cube\"")
        row = modality(name)
        if name in order:
            raise ValueError(f"--cond {name} is given twice; give each condition modality once")
        order.append(name)
        if row.family == "2d":
            sample.images[name] = _read_image(name, Path(value), size)
        else:
            payload = [value] if name in TEXT_VALUES else _read_payload(name, Path(value), size)
            sample.tokens[name] = _tokenize(name, payload, tokenizers)
    return sample, order


def _read_file(name: str, path: Path) -> tuple[bytes, str]:
    """The bytes and format of condition ``name``'s file, checked against its codec's formats."""
    if not path.is_file():
        raise ValueError(f"--cond {name}={path}: no such file")
    fmt = path.suffix.lower().lstrip(".")
    formats = modality(name).codec.formats
    if fmt not in formats:
        raise ValueError(f"--cond {name}={path}: a {name} condition is read from {', '.join('.' + f for f in formats)} files")
    return path.read_bytes(), fmt


def _read_image(name: str, path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The model image [3, H, W] of a 2D condition file."""
    data, fmt = _read_file(name, path)
    decoded = modality(name).codec.decode(data, fmt, f"--cond {name}={path}", DecodeLimits())
    value = np.asarray(decoded.value)
    if tuple(value.shape[:2]) != size:
        raise ValueError(
            f"--cond {name}={path} is {value.shape[0]}x{value.shape[1]} px but the generation size is "
            f"{size[0]}x{size[1]} (--size): resize the file, or pass --size {value.shape[0]} if it is square"
        )
    return torch.from_numpy(np.ascontiguousarray(to_image(name, value, decoded.valid))).float()


def _read_payload(name: str, path: Path, size: tuple[int, int]) -> Payload:
    """The decoded value of a 1D condition file (boxes placed on the generation size)."""
    data, fmt = _read_file(name, path)
    codec = modality(name).codec
    what = f"--cond {name}={path}"
    value = codec.decode(data, fmt, what, DecodeLimits()).value
    return codec.place(value, size[0], size[1], what) if codec.needs_image_size else value


def _tokenize(name: str, payload: Payload, tokenizers: ModalityTokenizers | None) -> list[int]:
    """Content ids of 1D condition ``name``."""
    if tokenizers is None:
        raise ValueError(f"--cond {name} needs the checkpoint's text tokenizer, and none was found; pass --text-tokenizer DIR")
    return tokenizers.encode(name, payload, np.random.default_rng(0))


def check_targets(
    targets: list[str], text_tokenizer: bool, quantizers: dict[str, FeatureQuantizer], has_vae: bool,
    conditions: list[str], expression: str | None,
) -> None:  # fmt: skip
    """Refuse targets the checkpoint cannot generate or decode, before any weight is read."""
    if not targets:
        raise ValueError("no --target given; name at least one, e.g. --target depth")
    images = [n for n in [*targets, *conditions] if modality(n).family == "2d"]
    if images and not has_vae:
        raise ValueError(
            f"{images[0]} needs the checkpoint's VAE, and this one has none (to-hf of a run from the seeded init "
            "writes none): pass the training run directory itself as --ckpt"
        )
    for name in targets:
        kind = modality(name).kind
        if kind in NEEDS_TEXT_TOKENIZER and not text_tokenizer:
            raise ValueError(
                f"--target {name} needs the checkpoint's text tokenizer, and none was found next to the weights; "
                "pass --text-tokenizer DIR"
            )
        if kind.startswith("feature") and name not in quantizers:
            raise ValueError(f"--target {name} needs its feature codebook ({name}.safetensors), and none was found; pass --vq DIR")
        if kind == "groundings" and not expression:
            raise ValueError(f"--target {name} needs the referring expression: add --expression \"the red cube\"")
    if len(set(targets)) != len(targets):
        raise ValueError("a --target is given twice; give each target modality once")
