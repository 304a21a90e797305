"""One random crop, flip and resize, applied identically to every modality of a sample.

Pixel-aligned maps must stay aligned, so the geometry is drawn once per sample and applied
to all of them; how each modality follows it (its resampling, what a flip does to its values,
how boxes, grids and text follow) is its ``warp`` column in the modality table
(``modalities/geometry.py`` lists them). Validity masks follow by nearest neighbour.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from modus_mega.data.shard_format import RawSample
from modus_mega.modalities import modality
from modus_mega.modalities.geometry import Geometry, warp_mask


def draw_geometry(
    size: tuple[int, int], rng: np.random.Generator, crop_min_side: float, hflip: bool, max_pixels: int, multiple: int
) -> Geometry:
    """Draw a crop keeping at least ``crop_min_side`` of each side, a flip with probability 1/2
    if ``hflip``, and an output size of at most ``max_pixels`` with sides multiples of ``multiple``."""
    h, w = size
    fraction = rng.uniform(crop_min_side, 1.0) if crop_min_side < 1.0 else 1.0
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    flip = bool(hflip and rng.random() < 0.5)
    scale = min(1.0, math.sqrt(max_pixels / (ch * cw)))
    out_h = max(multiple, int(ch * scale) // multiple * multiple)
    out_w = max(multiple, int(cw * scale) // multiple * multiple)
    return Geometry(top, left, ch, cw, flip, out_h, out_w)


def apply_geometry(sample: RawSample, g: Geometry) -> RawSample:
    """``sample`` with ``g`` applied to every modality; a modality with nothing left is removed."""
    size = sample.image_size
    modalities = {}
    for name, value in sample.modalities.items():
        warped = modality(name).warp(value, g, size)
        if warped is not None:
            modalities[name] = warped
    valid = {name: warp_mask(mask, g) for name, mask in sample.valid.items()}
    return replace(sample, modalities=modalities, valid=valid)


def random_geometry_for(
    sample: RawSample, rng: np.random.Generator, crop_min_side: float, hflip: bool, max_pixels: int, multiple: int
) -> Geometry | None:
    """A geometry for ``sample``, or None if it has no 2D modality or box annotation to take the size from."""
    size = sample.image_size
    if size is None:
        size = _annotation_size(sample)
    if size is None:
        return None
    return draw_geometry(size, rng, crop_min_side, hflip, max_pixels, multiple)


def _annotation_size(sample: RawSample) -> tuple[int, int] | None:
    """(H, W) of the first box annotation (in table order) of a sample without 2D maps, if any."""
    for name, value in sample.modalities.items():
        if modality(name).codec.needs_image_size:
            return value.height, value.width  # type: ignore[union-attr]
    return None
