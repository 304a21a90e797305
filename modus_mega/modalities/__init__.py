"""The 15 MODUS modalities as one plain table (DESIGN §2). No registry, no decorators.

A modality's index in ``MODALITIES`` is its ``modality_id`` everywhere: in packed
batches, in the vocabulary's start-marker range and in per-modality loss logs.

Each row carries everything that differs between modalities (STYLE 18): the shard file key
and codec (formats, bytes <-> value, ``codecs.py``), how the value follows a crop / flip /
resize (``geometry.py``), for 2D maps how it becomes the model's image, snaps back to its
training form and is shown to people (``pictures.py``), and for 1D modalities which
tokenizer reads it (``kind``). Code that needs per-modality behaviour looks it up here.

The table is read at call time (the functions below, and the module attributes
``MODALITY_NAMES``, ``MODALITY_ID``, ``FEATURE_MODALITIES``, ``NUM_MODALITIES`` computed on
access), so a test can extend ``MODALITIES`` and every reader sees the new row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from modus_mega.modalities import geometry
from modus_mega.modalities.codecs import (
    CaptionCodec,
    Codec,
    DepthCodec,
    DetectionsCodec,
    EdgesCodec,
    FeatureCodec,
    GroundingsCodec,
    LabelsCodec,
    NormalCodec,
    RgbCodec,
)
from modus_mega.modalities.geometry import Warp
from modus_mega.modalities.pictures import (
    DEPTH_PICTURE,
    EDGES_PICTURE,
    LABELS_PICTURE,
    NORMAL_PICTURE,
    RGB_PICTURE,
    Picture,
)

Kind = Literal["image", "text", "detections", "groundings", "feature_global", "feature_local"]


@dataclass(frozen=True)
class Modality:
    """One row of the modality table."""

    name: str  # canonical name, used in configs, logs and the vocabulary's start markers
    family: Literal["2d", "1d"]  # 2d: pixel-aligned map (VAE/ViT tokens); 1d: discrete tokens
    kind: Kind  # 2d: "image"; 1d: which tokenizer reads it (text, boxes, a feature quantizer)
    file_key: str  # the name of its files in a shard sample: {key}.{file_key}.{format}
    codec: Codec  # accepted formats (first = written) and bytes <-> value
    warp: Warp  # how the value follows the sample's crop, flip and resize
    picture: Picture | None = None  # 2d only: model image, snap, view for people

    def describe(self) -> dict[str, Any]:
        """The plain fields of the row (name, family, kind), for exported configs."""
        return {"name": self.name, "family": self.family, "kind": self.kind}


MODALITIES: tuple[Modality, ...] = (
    Modality("rgb", "2d", "image", "rgb", RgbCodec(), geometry.SMOOTH, RGB_PICTURE),
    Modality("depth", "2d", "image", "depth", DepthCodec(), geometry.NEAREST, DEPTH_PICTURE),
    Modality("normal", "2d", "image", "normal", NormalCodec(), geometry.NORMAL, NORMAL_PICTURE),
    Modality("seg", "2d", "image", "seg", LabelsCodec(), geometry.NEAREST, LABELS_PICTURE),
    Modality("sam_seg", "2d", "image", "sam_seg", LabelsCodec(), geometry.NEAREST, LABELS_PICTURE),
    Modality("canny", "2d", "image", "canny", EdgesCodec(), geometry.COVERAGE, EDGES_PICTURE),
    Modality("sam_edge", "2d", "image", "sam_edge", EdgesCodec(), geometry.COVERAGE, EDGES_PICTURE),
    Modality("caption", "1d", "text", "caption", CaptionCodec(), geometry.warp_caption),
    # `det`: the name 4M and most pseudo-labelers use
    Modality("detection", "1d", "detections", "det", DetectionsCodec(), geometry.warp_detections),
    Modality("grounding", "1d", "groundings", "grounding", GroundingsCodec(), geometry.warp_groundings),
    Modality("dinov2_global", "1d", "feature_global", "dinov2_global", FeatureCodec(local=False), geometry.keep),
    Modality("dinov2_local", "1d", "feature_local", "dinov2_local", FeatureCodec(local=True), geometry.warp_local_features),
    Modality("clip_global", "1d", "feature_global", "clip_global", FeatureCodec(local=False), geometry.keep),
    Modality("imagebind_global", "1d", "feature_global", "imagebind_global", FeatureCodec(local=False), geometry.keep),
    Modality(
        "imagebind_local", "1d", "feature_local", "imagebind_local", FeatureCodec(local=True), geometry.warp_local_features
    ),
)


def modality_names() -> tuple[str, ...]:
    """Every modality name, in table (= ``modality_id``) order."""
    return tuple(m.name for m in MODALITIES)


def modality_id(name: str) -> int:
    """The ``modality_id`` of ``name`` (its row index)."""
    return modality_names().index(modality(name).name)


def feature_modalities() -> tuple[str, ...]:
    """The 1D modalities read by a feature quantizer, in table order (their codebook order)."""
    return tuple(m.name for m in MODALITIES if m.kind.startswith("feature"))


def image_modalities() -> tuple[str, ...]:
    """The 2D modalities, in table order."""
    return tuple(m.name for m in MODALITIES if m.family == "2d")


def modality(name: str) -> Modality:
    """Look a modality up by name, with an error that lists the valid names."""
    for row in MODALITIES:
        if row.name == name:
            return row
    raise ValueError(f"unknown modality {name!r}; valid modalities: {list(modality_names())}")


def modality_of_file_key(file_key: str) -> Modality | None:
    """The modality stored under ``file_key`` in shards, or None for an unknown key."""
    return next((m for m in MODALITIES if m.file_key == file_key), None)


def _picture(name: str) -> Picture:
    picture = modality(name).picture
    if picture is None:
        raise ValueError(f"{name!r} is a 1D modality; only 2D modalities ({', '.join(image_modalities())}) are pictures")
    return picture


def to_image(name: str, value: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The 2D modality ``name``'s value (codec type) as the model's float32 [3, H, W] in [-1, 1]."""
    return _picture(name).to_image(value, valid)


def snap(name: str, image: np.ndarray) -> np.ndarray:
    """A generated [3, H, W] image of ``name`` snapped to its training form (labels, edges; else itself)."""
    return _picture(name).snap(image)


def render_for_people(name: str, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a model image [3, H, W] of ``name``, snapped first (depth colour-mapped, ...)."""
    return _picture(name).show(image)


def __getattr__(attribute: str) -> Any:
    """``MODALITY_NAMES``, ``MODALITY_ID``, ``FEATURE_MODALITIES``, ``NUM_MODALITIES``: computed from the table now."""
    derived = {
        "MODALITY_NAMES": modality_names,
        "MODALITY_ID": lambda: {name: i for i, name in enumerate(modality_names())},
        "FEATURE_MODALITIES": feature_modalities,
        "NUM_MODALITIES": lambda: len(MODALITIES),
    }
    if attribute in derived:
        return derived[attribute]()
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
