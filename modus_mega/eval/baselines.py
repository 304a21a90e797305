"""Trivial baselines: predictions that ignore the condition, so a model's numbers have a floor.

``--baseline NAME`` scores these instead of a model (no checkpoint needed); each baseline covers
the targets where it means something, computed over the evaluated scenes themselves (an
optimistic floor: it sees the suite's statistics):

- ``mean``: depth = one constant, the mean valid depth (after the metric's scale and shift fit,
  any constant scores the same);
- ``constant``: normal = the mean valid normal of the suite, normalised, at every pixel;
- ``majority``: seg / sam_seg = the most frequent id of the suite at every pixel; canny / sam_edge
  = the most frequent pixel value (no edges).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from modus_mega.eval.suites import EvalScene
from modus_mega.modalities.values import Payload

Baseline = Callable[[str, Sequence[EvalScene]], list[Payload]]


def _truths(name: str, scenes: Sequence[EvalScene]) -> list[np.ndarray]:
    return [np.asarray(s.truth[name]) for s in scenes]


def _mean_depth(name: str, scenes: Sequence[EvalScene]) -> list[Payload]:
    values = np.concatenate([t[s.valid[name]] for t, s in zip(_truths(name, scenes), scenes)])
    mean = float(values.mean()) if values.size else 1.0
    return [np.full(t.shape, mean, np.float32) for t in _truths(name, scenes)]


def _constant_normal(name: str, scenes: Sequence[EvalScene]) -> list[Payload]:
    vectors = np.concatenate([t[s.valid[name]] for t, s in zip(_truths(name, scenes), scenes)])  # [P, 3]
    mean = vectors.sum(0) if vectors.size else np.array([0.0, 1.0, 0.0])
    unit = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return [np.broadcast_to(unit, t.shape).copy() for t in _truths(name, scenes)]


def _majority(name: str, scenes: Sequence[EvalScene]) -> list[Payload]:
    values, counts = np.unique(np.concatenate([t.ravel() for t in _truths(name, scenes)]), return_counts=True)
    top = values[counts.argmax()]
    return [np.full(t.shape, top, t.dtype) for t in _truths(name, scenes)]


BASELINES: dict[str, dict[str, Baseline]] = {
    "mean": {"depth": _mean_depth},
    "constant": {"normal": _constant_normal},
    "majority": {n: _majority for n in ("seg", "sam_seg", "canny", "sam_edge")},
}


def baseline(name: str) -> dict[str, Baseline]:
    """The predictors of baseline ``name`` per target modality, with an error that lists the baselines."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    return BASELINES[name]
