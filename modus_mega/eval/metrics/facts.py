"""Plain scene facts read by the caption and text -> rgb metrics.

A data source (the synthetic generator, a benchmark's prompt list) turns its scene graph into
these few records, so the metrics depend on no generator: objects with a colour and a shape,
and spatial relations between them as the captions state them.
"""

from __future__ import annotations

from dataclasses import dataclass

RELATIONS: tuple[str, ...] = ("left of", "right of", "in front of", "behind")
LEFT_RIGHT: tuple[str, ...] = ("left of", "right of")  # the relations an image check can see


@dataclass(frozen=True)
class ObjectFact:
    """One object of a scene."""

    colour: str  # e.g. "red"
    shape: str  # e.g. "sphere"

    @property
    def name(self) -> str:
        """``"red sphere"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class RelationFact:
    """``objects[subject]`` is ``relation`` ``objects[anchor]`` (in the image)."""

    subject: int
    relation: str  # one of RELATIONS
    anchor: int


@dataclass(frozen=True)
class SceneFacts:
    """What is true of one scene: its objects and the relations that hold between them."""

    objects: tuple[ObjectFact, ...]
    relations: tuple[RelationFact, ...] = ()

    def __post_init__(self) -> None:
        for fact in self.relations:
            if fact.relation not in RELATIONS:
                raise ValueError(f"relation {fact.relation!r} is not one of {RELATIONS}")
            if not (0 <= fact.subject < len(self.objects) and 0 <= fact.anchor < len(self.objects)):
                raise ValueError(f"relation {fact} names an object outside the scene's {len(self.objects)}")
