"""Directions of the any-to-any grid: one source modality as the single condition of one target.

A direction is ``source:target`` (``rgb:depth``); a chain ``rgb:depth:normal`` generates each
intermediate target from the previous one and conditions the last on all of them (the paper's
chained generation, Table 2). The grid of a suite is every ordered pair of distinct modalities
that every scene has and the model can read and write (feature modalities need a codebook).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from modus_mega.modalities import modality, modality_names


@dataclass(frozen=True)
class Direction:
    """``steps[0]`` is the condition; ``steps[1:]`` are generated in order; the last is scored."""

    steps: tuple[str, ...]

    @property
    def source(self) -> str:
        """The given condition."""
        return self.steps[0]

    @property
    def target(self) -> str:
        """The scored target."""
        return self.steps[-1]

    def __str__(self) -> str:
        return ":".join(self.steps)


def parse_directions(text: str) -> list[Direction]:
    """``"rgb:depth,caption:rgb"`` -> directions; an unknown modality or a malformed entry raises ValueError."""
    directions: list[Direction] = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        steps = tuple(s.strip() for s in entry.split(":"))
        if len(steps) < 2 or len(set(steps)) != len(steps):
            raise ValueError(f"direction {entry!r} must be SOURCE:TARGET (or SOURCE:MIDDLE:TARGET), no repeats, e.g. rgb:depth")
        for name in steps:
            if name not in modality_names():
                raise ValueError(f"unknown modality {name!r} in direction {entry!r}; valid: {', '.join(modality_names())}")
        directions.append(Direction(steps))
    if not directions:
        raise ValueError("--directions is empty; give e.g. rgb:depth,caption:rgb")
    return directions


def grid(available: Iterable[str]) -> list[Direction]:
    """Every ``source:target`` pair of distinct modalities among ``available``, in table order."""
    names = [n for n in modality_names() if n in set(available)]
    return [Direction((s, t)) for s in names for t in names if s != t]


def check_supported(directions: Sequence[Direction], available: Iterable[str]) -> None:
    """Refuse a direction that uses a modality the suite's scenes or the model's tokenizers lack."""
    have = set(available)
    for direction in directions:
        missing = [s for s in direction.steps if s not in have]
        if missing:
            hint = " (train its codebook with `python -m modus_mega.datasets.train_vq`)" if any(
                modality(m).kind.startswith("feature") for m in missing
            ) else ""
            raise ValueError(f"direction {direction} needs {', '.join(missing)}, which this suite / model lacks{hint}")
