"""The 15 MODUS modalities as one plain table (DESIGN §2). No registry, no decorators.

A modality's index in ``MODALITIES`` is its ``modality_id`` everywhere: in packed
batches, in the vocabulary's start-marker range and in per-modality loss logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Modality:
    """One row of the modality table."""

    name: str  # canonical name, used in configs, logs and shard file keys
    family: Literal["2d", "1d"]  # 2d: pixel-aligned map (VAE/ViT tokens); 1d: discrete tokens
    kind: Literal["image", "text", "boxes", "feature_global", "feature_local"]  # how it is tokenized


MODALITIES: tuple[Modality, ...] = (
    Modality("rgb", "2d", "image"),
    Modality("depth", "2d", "image"),
    Modality("normal", "2d", "image"),
    Modality("seg", "2d", "image"),
    Modality("sam_seg", "2d", "image"),
    Modality("canny", "2d", "image"),
    Modality("sam_edge", "2d", "image"),
    Modality("caption", "1d", "text"),
    Modality("detection", "1d", "boxes"),
    Modality("grounding", "1d", "boxes"),
    Modality("dinov2_global", "1d", "feature_global"),
    Modality("dinov2_local", "1d", "feature_local"),
    Modality("clip_global", "1d", "feature_global"),
    Modality("imagebind_global", "1d", "feature_global"),
    Modality("imagebind_local", "1d", "feature_local"),
)

MODALITY_NAMES: tuple[str, ...] = tuple(m.name for m in MODALITIES)
MODALITY_ID: dict[str, int] = {m.name: i for i, m in enumerate(MODALITIES)}
FEATURE_MODALITIES: tuple[str, ...] = tuple(m.name for m in MODALITIES if m.kind.startswith("feature"))
NUM_MODALITIES = len(MODALITIES)


def modality(name: str) -> Modality:
    """Look a modality up by name, with an error that lists the valid names."""
    try:
        return MODALITIES[MODALITY_ID[name]]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; valid modalities: {list(MODALITY_NAMES)}") from None
