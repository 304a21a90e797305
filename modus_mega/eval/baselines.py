"""Trivial baselines: predictions that ignore the condition, so a model's numbers have a floor and a ceiling.

``--baseline NAME`` scores these instead of a model (no checkpoint needed); each baseline covers
the targets where it means something, computed over the evaluated scenes themselves (an
optimistic floor: it sees the suite's statistics):

- ``mean``: depth = one constant, the mean valid log depth (after the metric's scale and shift fit,
  any constant scores the same);
- ``constant``: normal = the mean valid normal of the suite, normalised, at every pixel;
- ``majority``: seg / sam_seg = the most frequent id of the suite at every pixel; canny / sam_edge
  = the most frequent pixel value (no edges);
- ``oracle``: every target = its ground truth, the ceiling of each metric on this suite (1 where
  the metric is exact; below 1 where the suite's truth escapes the metric, e.g. a tiny object the
  text -> rgb check cannot count). 2D targets are the truth's model image decoded as a generated
  one is; 1D targets the truth before tokenization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from modus_mega.eval.scoring import SCORERS, Context
from modus_mega.eval.suites import EvalScene
from modus_mega.inference.generator import GeneratedTarget
from modus_mega.modalities import modality, modality_names
from modus_mega.modalities.values import Payload

Baseline = Callable[[str, Sequence[EvalScene], Context], list[Payload]]  # (target, scenes, ctx) -> predictions


def _truths(name: str, scenes: Sequence[EvalScene]) -> list[np.ndarray]:
    return [np.asarray(s.truth[name]) for s in scenes]


def _mean_depth(name: str, scenes: Sequence[EvalScene], ctx: Context) -> list[Payload]:
    values = np.concatenate([np.log(t[s.valid[name]]) for t, s in zip(_truths(name, scenes), scenes)])
    mean = float(values.mean()) if values.size else 0.0
    return [np.full(t.shape, mean, np.float32) for t in _truths(name, scenes)]


def _constant_normal(name: str, scenes: Sequence[EvalScene], ctx: Context) -> list[Payload]:
    vectors = np.concatenate([t[s.valid[name]] for t, s in zip(_truths(name, scenes), scenes)])  # [P, 3]
    mean = vectors.sum(0) if vectors.size else np.array([0.0, 1.0, 0.0])
    unit = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return [np.broadcast_to(unit, t.shape).copy() for t in _truths(name, scenes)]


def _majority(name: str, scenes: Sequence[EvalScene], ctx: Context) -> list[Payload]:
    values, counts = np.unique(np.concatenate([t.ravel() for t in _truths(name, scenes)]), return_counts=True)
    top = values[counts.argmax()]
    return [np.full(t.shape, top, t.dtype) for t in _truths(name, scenes)]


def _oracle(name: str, scenes: Sequence[EvalScene], ctx: Context) -> list[Payload]:
    if modality(name).family == "1d":
        return [s.truth[name] for s in scenes]
    return [SCORERS[name].decode(GeneratedTarget(name, image=s.sample.images[name]), s, ctx) for s in scenes]


BASELINES: dict[str, dict[str, Baseline]] = {
    "mean": {"depth": _mean_depth},
    "constant": {"normal": _constant_normal},
    "majority": {n: _majority for n in ("seg", "sam_seg", "canny", "sam_edge")},
    "oracle": {n: _oracle for n in modality_names()},
}


def baseline(name: str) -> dict[str, Baseline]:
    """The predictors of baseline ``name`` per target modality, with an error that lists the baselines."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    return BASELINES[name]
