"""Evaluation suites: where the scenes of a benchmark, with their exact ground truth, come from.

A suite yields ``EvalScene``s: the model-ready ``Sample`` (2D maps rendered as model images,
1D modalities tokenized) that supplies the conditions, and the ground-truth values the scorers
read (depth in metres, normals, label maps, boxes, captions, features, scene facts).

``synth`` renders held-out scenes with ``modus_mega.datasets.synth``. Held-out means disjoint
from training: synthetic sample ``i`` of a dataset depends only on ``(seed, i)`` through
``np.random.default_rng([seed, i])``, and the suite draws its scenes under ``HELD_OUT_SEED``,
a seed no training dataset uses (``datasets.synth`` writes seed 0 unless told otherwise;
``--seed`` moves the suite elsewhere). Different seeds give independent streams.

External benchmarks (NYUv2, DIODE, RefCOCO) plug in through the same interface with a local
data directory; their loaders are not installed here and refuse with the layout they expect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from modus_mega.data.documents import Sample
from modus_mega.datasets import synth
from modus_mega.eval.metrics.captions import CaptionVocabulary
from modus_mega.eval.metrics.facts import ObjectFact, RelationFact, SceneFacts
from modus_mega.eval.metrics.geneval import ColourPalette, checkable_colours
from modus_mega.modalities import modality, to_image
from modus_mega.modalities.values import Groundings, Payload
from modus_mega.tokenizers import ModalityTokenizers

HELD_OUT_SEED = 1_000_003  # the synth suite's dataset seed; training data is written with seed 0


@dataclass
class EvalScene:
    """One evaluation scene: conditions for the model and the exact ground truth of every modality."""

    key: str
    sample: Sample  # model-ready conditions (images [3, H, W] in [-1, 1], token ids)
    truth: dict[str, Payload]  # decoded ground-truth values (datasets' RawSample types)
    valid: dict[str, np.ndarray] = field(default_factory=dict)  # [H, W] bool valid pixels per 2D modality
    facts: SceneFacts = SceneFacts(())  # visible objects and their relations (captions)
    geneval_facts: SceneFacts = SceneFacts(())  # the same restricted to hue-checkable colours (-> rgb)
    scene_class: int = 0  # class label for feature k-NN retrieval
    expression: list[int] = field(default_factory=list)  # text ids of the grounding target's expression


@dataclass(frozen=True)
class SuiteInfo:
    """What scorers need to know about a suite besides its scenes."""

    num_classes: int  # semantic segmentation classes
    vocabulary: CaptionVocabulary  # colour and shape words of captions
    palette: ColourPalette  # albedo palette for the text -> rgb checks
    image_size: tuple[int, int]  # (H, W) of every scene
    feature_grid: tuple[int, int]  # local feature grid


class Suite(Protocol):
    """A benchmark: its description and its scenes."""

    info: SuiteInfo

    def scenes(self, tokenizers: ModalityTokenizers | None) -> list[EvalScene]:
        """Every scene, its 1D conditions tokenized with ``tokenizers`` (None: 2D modalities only)."""
        ...


def _facts(visible: Sequence[synth.VisibleObject], width: int, colours: Sequence[str] | None) -> SceneFacts:
    """Objects (with ``colours`` only, when given) and every pairwise relation between them."""
    kept = [v for v in visible if colours is None or v.obj.colour in colours]
    if colours is not None:  # image checks tell objects apart by colour: relate only colours that occur once
        names = [v.obj.colour for v in kept]
        related = [i for i, v in enumerate(kept) if names.count(v.obj.colour) == 1]
    else:
        related = list(range(len(kept)))
    relations = tuple(
        RelationFact(i, synth.relation(kept[i], kept[j], width), j) for i in related for j in related if i != j
    )
    return SceneFacts(tuple(ObjectFact(v.obj.colour, v.obj.shape) for v in kept), relations)


def scene_class(seg: np.ndarray) -> int:
    """The k-NN class of a synthetic scene: the object class (sphere, cube, cylinder) covering most pixels, 0 if none.

    Class ids are the seg ids minus the first object class, plus one (0: no object visible).
    """
    first = synth.CLASS_NAMES.index(synth.SHAPES[0])
    counts = np.bincount(seg.ravel(), minlength=len(synth.CLASS_NAMES))[first:]
    return 1 + int(counts.argmax()) if counts.any() else 0


@dataclass
class SynthSuite:
    """Held-out synthetic scenes with exact ground truth (``datasets.synth``)."""

    num_scenes: int
    image_size: int = 64
    feature_grid: int = 4
    seed: int = HELD_OUT_SEED

    def __post_init__(self) -> None:
        if self.num_scenes < 1:
            raise ValueError(f"--num-scenes must be at least 1, got {self.num_scenes}")
        self.config = synth.SynthConfig(image_size=self.image_size, seed=self.seed, feature_grid=self.feature_grid)
        palette = ColourPalette(colours=synth.COLOURS, background=(tuple(synth._SKY_ZENITH),))
        self.info = SuiteInfo(
            num_classes=len(synth.CLASS_NAMES),
            vocabulary=CaptionVocabulary(colours=tuple(synth.COLOURS), shapes=synth.SHAPES),
            palette=palette,
            image_size=(self.image_size, self.image_size),
            feature_grid=(self.feature_grid, self.feature_grid),
        )
        self._checkable = checkable_colours(palette)

    def scenes(self, tokenizers: ModalityTokenizers | None) -> list[EvalScene]:
        """Render scenes ``0 .. num_scenes - 1`` of the held-out seed (no tokenizers: 2D modalities only)."""
        encoders = synth.make_encoders(self.config)
        return [self._scene(i, tokenizers, encoders) for i in range(self.num_scenes)]

    def _scene(self, index: int, tokenizers: ModalityTokenizers | None, encoders: list[synth.StandInEncoder]) -> EvalScene:
        scene, rendering, values = synth.generate_sample(index, self.config, encoders)
        rng = np.random.default_rng([self.seed, index, 1])  # picks the caption a caption condition shows
        valid = {"depth": rendering.depth > 0, "normal": rendering.depth > 0}
        images: dict[str, torch.Tensor] = {}
        tokens: dict[str, list[int]] = {}
        for name, value in values.items():
            if modality(name).family == "2d":
                assert isinstance(value, np.ndarray)
                images[name] = torch.from_numpy(to_image(name, value, valid.get(name)))
            elif tokenizers and (not modality(name).kind.startswith("feature") or name in tokenizers.quantizers):
                tokens[name] = tokenizers.encode(name, value, rng)
        expression: list[int] = []
        grounding = values.get("grounding")
        if tokenizers and isinstance(grounding, Groundings):  # the first expression is the one asked for; its box the truth
            tokens["grounding"] = tokenizers.boxes.encode_groundings(grounding, 0)
            expression = tokens["grounding"][:-4]
        visible = synth.visible_objects(scene, rendering)
        width = self.image_size
        return EvalScene(
            key=f"heldout-{synth.sample_key(index)}",
            sample=Sample(key=synth.sample_key(index), images=images, tokens=tokens),
            truth=values,
            valid=valid,
            facts=_facts(visible, width, None),
            geneval_facts=_facts(visible, width, self._checkable),
            scene_class=scene_class(rendering.seg),
            expression=expression,
        )


@dataclass(frozen=True)
class ExternalSuite:
    """A benchmark read from a local data directory; ``layout`` says what the directory must hold."""

    name: str
    layout: str

    def open(self, data_dir: str | None) -> Suite:
        """Refuse: no loader for this benchmark is installed here (the seam for one)."""
        if data_dir is not None and not Path(data_dir).is_dir():
            raise ValueError(f"--data-dir {data_dir} is not a directory")
        raise ValueError(f"suite {self.name!r} is not installed here: give --data-dir with {self.layout} and add its loader")


EXTERNAL_SUITES: dict[str, ExternalSuite] = {
    "nyuv2": ExternalSuite("nyuv2", "the NYUv2 labelled split (rgb/*.png, depth/*.png in mm, normal/*.png)"),
    "diode": ExternalSuite("diode", "DIODE val (<scene>/*_image.png, *_depth.npy, *_depth_mask.npy, *_normal.npy)"),
    "refcoco": ExternalSuite("refcoco", "RefCOCO (refs(unc).p, instances.json, images/train2014/*.jpg)"),
}
SUITE_NAMES: tuple[str, ...] = ("synth", *EXTERNAL_SUITES)


def open_suite(
    name: str, num_scenes: int, data_dir: str | None = None, image_size: int = 64, feature_grid: int = 4,
    seed: int = HELD_OUT_SEED,
) -> Suite:  # fmt: skip
    """The suite called ``name``; unknown names and absent data directories fail with one clear line."""
    factories: dict[str, Callable[[], Suite]] = {
        "synth": lambda: SynthSuite(num_scenes, image_size, feature_grid, seed),
        **{n: (lambda s=s: s.open(data_dir)) for n, s in EXTERNAL_SUITES.items()},
    }
    if name not in factories:
        raise ValueError(f"unknown suite {name!r}; choose one of {list(SUITE_NAMES)}")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a directory")
    return factories[name]()
