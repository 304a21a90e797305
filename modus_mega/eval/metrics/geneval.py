"""GenEval-style checks of text -> rgb: does a generated image show the prompt's facts?

GenEval (Ghosh et al., 2023) scores a prompt as correct when a detector finds its objects with
the right counts, colours and positions. Synthetic scenes allow the same checks without a model,
because their objects are flat albedo colours from a known palette under one white light:

1. Colour masks. A pixel is linearised (``(v / 255) ** gamma``); its colour is
   ``albedo * shading + white specular``, so subtracting the smallest channel removes the
   specular term and normalising removes the shading: the direction of ``c - min(c)`` (the hue)
   is the albedo's own. Each pixel takes the palette or background colour of nearest hue when
   the angle is at most ``max_hue_angle_deg`` and the pixel is saturated and bright enough to
   have a hue (grey ground, white sky and dark shadows have none).
2. Counts. Connected components (8-connectivity) of each colour's mask, ignoring those smaller
   than ``min_area_fraction`` of the image, must number exactly the prompt's objects of that
   colour, for every checkable palette colour: absent colours must be absent (no extra objects).
3. Colours. Every colour the prompt names is present (this fails with a missing object even
   when the other checks of its prompt pass, and is reported on its own).
4. Relations. "left of" / "right of" compare the mean column of the two objects' colour masks;
   "in front of" / "behind" are not checked (no model-free depth cue).

A prompt is correct when all its checks pass; the score is the share of correct prompts, as in
GenEval. Shapes are not checked (no model-free shape classifier), so the prompt's colours identify
its objects: a prompt may only use checkable colours (hues at least twice ``max_hue_angle_deg``
from every other palette or background hue; ``checkable_colours``), and related objects must
have colours of their own in the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from modus_mega.eval.metrics.arrays import ArrayLike, as_items, to_numpy
from modus_mega.eval.metrics.facts import LEFT_RIGHT, SceneFacts

RGB = tuple[float, float, float]
MAX_HUE_ANGLE_DEG = 5.0  # a pixel's hue must lie this close to its colour's
MIN_SATURATION = 0.25  # (max - min) / max of linear rgb below which a pixel has no hue
MIN_VALUE = 0.02  # linear max channel below which a pixel is too dark to have a hue
MIN_AREA_FRACTION = 0.002  # components smaller than this share of the image are noise
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ColourPalette:
    """The colours a renderer paints objects with, and the chromatic background colours."""

    colours: Mapping[str, RGB]  # linear rgb albedo of each object colour name
    background: tuple[RGB, ...] = ()  # linear rgb of coloured non-objects (e.g. the sky's zenith)
    gamma: float = 2.2  # images store (linear ** (1 / gamma)) * 255


@dataclass(frozen=True)
class PromptCheck:
    """The checks of one image against its prompt."""

    colours: bool  # every named colour is present
    counts: bool  # every checkable colour has exactly its number of objects
    relations: bool | None  # every left/right relation holds; None when the prompt has none

    @property
    def correct(self) -> bool:
        """All checks pass."""
        return self.colours and self.counts and self.relations is not False


@dataclass(frozen=True)
class GenEvalMetrics:
    """Shares of prompts passing each check, and all of them (``score``)."""

    score: float
    colour_accuracy: float
    count_accuracy: float
    relation_accuracy: float  # over prompts with a left/right relation; nan without any
    checks: tuple[PromptCheck, ...]


def _hues(linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit hue directions [..., 3] of linear rgb [..., 3], and whether each has a hue [...]."""
    high, low = linear.max(-1), linear.min(-1)
    chroma = linear - low[..., None]
    norm = np.linalg.norm(chroma, axis=-1, keepdims=True)
    has_hue = (high >= MIN_VALUE) & (high - low >= MIN_SATURATION * high)
    return chroma / np.where(norm > 0, norm, 1.0), has_hue


def _reference_hues(palette: ColourPalette) -> tuple[list[str], np.ndarray]:
    """Names and hues [R, 3] of the chromatic references: palette colours, then background ones."""
    names = list(palette.colours) + [f"<background {i}>" for i in range(len(palette.background))]
    colours = np.array([*palette.colours.values(), *palette.background], dtype=np.float64).reshape(-1, 3)
    hues, has_hue = _hues(colours)
    return [n for n, keep in zip(names, has_hue) if keep], hues[has_hue]


def checkable_colours(palette: ColourPalette, max_hue_angle_deg: float = MAX_HUE_ANGLE_DEG) -> tuple[str, ...]:
    """Palette colours whose hue is at least 2 x ``max_hue_angle_deg`` from every other reference."""
    names, hues = _reference_hues(palette)
    angles = np.degrees(np.arccos(np.clip(hues @ hues.T, -1.0, 1.0)))  # [R, R]
    np.fill_diagonal(angles, np.inf)
    return tuple(n for n, row in zip(names, angles) if n in palette.colours and row.min() >= 2 * max_hue_angle_deg)


def colour_labels(
    image: np.ndarray, palette: ColourPalette, max_hue_angle_deg: float = MAX_HUE_ANGLE_DEG
) -> tuple[np.ndarray, list[str]]:
    """int [H, W] index into the returned reference names of each pixel of uint8 [H, W, 3], -1 for none."""
    names, references = _reference_hues(palette)
    hues, has_hue = _hues((image.astype(np.float64) / 255.0) ** palette.gamma)
    cosine = hues @ references.T  # [H, W, R]
    best = cosine.argmax(-1)
    close = cosine.max(-1) >= np.cos(np.radians(max_hue_angle_deg))
    return np.where(has_hue & close, best, -1), names


def check_image(
    image: ArrayLike,
    facts: SceneFacts,
    palette: ColourPalette,
    max_hue_angle_deg: float = MAX_HUE_ANGLE_DEG,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> PromptCheck:
    """Check one uint8 [H, W, 3] image against its prompt's facts (module protocol)."""
    checkable = checkable_colours(palette, max_hue_angle_deg)
    wanted = [o.colour for o in facts.objects]
    for colour in wanted:
        if colour not in checkable:
            raise ValueError(f"colour {colour!r} cannot be told apart by hue; prompts may use {checkable}")
    for relation in (r for r in facts.relations if r.relation in LEFT_RIGHT):
        for index in (relation.subject, relation.anchor):
            if wanted.count(wanted[index]) != 1:
                raise ValueError(f"relation {relation} needs the colour {wanted[index]!r} to be unique in the prompt")
    rgb = to_numpy(image)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"check_image: expected one uint8 [H, W, 3] image, got {rgb.dtype} {rgb.shape}")
    labels, names = colour_labels(rgb, palette, max_hue_angle_deg)
    min_area = max(1, round(min_area_fraction * labels.size))
    found: dict[str, int] = {}
    columns: dict[str, float] = {}
    for colour in checkable:
        components, _ = ndimage.label(labels == names.index(colour), structure=_EIGHT_CONNECTED)  # [H, W] 0 = none
        sizes = np.bincount(components.ravel())[1:]
        kept = np.isin(components, 1 + np.nonzero(sizes >= min_area)[0])
        found[colour] = int((sizes >= min_area).sum())
        if kept.any():
            columns[colour] = float(np.nonzero(kept)[1].mean())
    relation_checks = []
    for relation in (r for r in facts.relations if r.relation in LEFT_RIGHT):
        subject, anchor = wanted[relation.subject], wanted[relation.anchor]
        if subject not in columns or anchor not in columns:
            relation_checks.append(False)
        elif relation.relation == "left of":
            relation_checks.append(columns[subject] < columns[anchor])
        else:
            relation_checks.append(columns[subject] > columns[anchor])
    return PromptCheck(
        colours=all(found[c] > 0 for c in wanted),
        counts=all(found[c] == wanted.count(c) for c in checkable),
        relations=all(relation_checks) if relation_checks else None,
    )


def geneval_score(
    images: ArrayLike | Sequence[ArrayLike],
    facts: Sequence[SceneFacts],
    palette: ColourPalette,
    max_hue_angle_deg: float = MAX_HUE_ANGLE_DEG,
    min_area_fraction: float = MIN_AREA_FRACTION,
) -> GenEvalMetrics:
    """GenEval-style score of generated uint8 images ([N, H, W, 3] or a list) for their prompts."""
    items = as_items(images, 3)
    if len(items) != len(facts) or not facts:
        raise ValueError(f"geneval_score: need one image per prompt, got {len(items)} images for {len(facts)} prompts")
    checks = tuple(check_image(i, f, palette, max_hue_angle_deg, min_area_fraction) for i, f in zip(items, facts))
    with_relations = [c.relations for c in checks if c.relations is not None]
    return GenEvalMetrics(
        score=float(np.mean([c.correct for c in checks])),
        colour_accuracy=float(np.mean([c.colours for c in checks])),
        count_accuracy=float(np.mean([c.counts for c in checks])),
        relation_accuracy=float(np.mean(with_relations)) if with_relations else float("nan"),
        checks=checks,
    )
