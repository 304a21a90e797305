"""Caption metrics on scenes with known facts: attribute recall and relation accuracy.

Protocol: a caption is lower-cased and split into words; a plural shape ("spheres") reads as
the shape. Per scene, against its ``SceneFacts``:

- colour recall: each distinct colour of the scene is a fact, recalled when the word occurs;
- shape recall: each distinct shape likewise;
- object recall: each object is recalled when "<colour> <shape>" occurs as adjacent words
  (the binding of colour to shape, which separate colour and shape words do not show);
- count accuracy: the caption's count is the number before "object(s)" when it states one
  ("three objects: ..."), else the number of distinct "<colour> <shape>" objects it names; it
  is right when it equals the number of objects of the scene;
- relation accuracy: every "<colour> <shape> <relation> [a|an|the] <colour> <shape>" phrase
  the caption states is checked against the scene's relations; a statement about an object the
  scene does not have is wrong. This is a precision, not a recall: a scene of n objects has
  n (n - 1) true relations and a good caption states one or two.

Recalls pool the facts of all scenes; ``attribute_recall`` is the mean of the colour, shape,
object and count scores; relation accuracy pools the stated relations (nan when none is stated).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modus_mega.eval.metrics.facts import RELATIONS, SceneFacts

NUMBER_WORDS: dict[str, int] = {
    word: value
    for value, word in enumerate(("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
} | {"zero": 0, "a": 1, "an": 1}


@dataclass(frozen=True)
class CaptionVocabulary:
    """The colour and shape words a caption is parsed for (the data source's palette and shapes)."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]


@dataclass(frozen=True)
class CaptionMetrics:
    """Caption scores over a set of scenes (module protocol)."""

    colour_recall: float
    shape_recall: float
    object_recall: float
    count_accuracy: float
    attribute_recall: float  # mean of the four above
    relation_accuracy: float  # nan when no caption states a relation
    num_relations_stated: int


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption states, in vocabulary words."""

    colours: frozenset[str]
    shapes: frozenset[str]
    objects: tuple[tuple[str, str], ...]  # (colour, shape) in order of mention, repeats kept
    count: int | None  # the stated number of objects, None when the caption states none
    relations: tuple[tuple[tuple[str, str], str, tuple[str, str]], ...]  # (subject, relation, anchor)


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def parse_caption(caption: str, vocabulary: CaptionVocabulary) -> ParsedCaption:
    """The colours, shapes, objects, count and relations that ``caption`` states."""
    shapes = set(vocabulary.shapes)
    words = [w[:-1] if w.endswith("s") and w[:-1] in shapes else w for w in re.findall(r"[a-z]+|\d+", caption.lower())]
    text = " ".join(words)
    colour, shape = _alternation(vocabulary.colours), _alternation(vocabulary.shapes)
    objects = tuple((m.group(1), m.group(2)) for m in re.finditer(rf"\b({colour}) ({shape})\b", text))
    relation_pattern = re.compile(
        rf"\b({colour}) ({shape}) ({_alternation(RELATIONS)}) (?:(?:a|an|the) )?({colour}) ({shape})\b"
    )
    # Chained statements ("a left of b right of c") share an object: search on from each anchor.
    relations, start = [], 0
    while (m := relation_pattern.search(text, start)) is not None:
        relations.append(((m.group(1), m.group(2)), m.group(3), (m.group(4), m.group(5))))
        start = m.start(4)
    count_match = re.search(rf"\b({_alternation(NUMBER_WORDS)}|\d+) objects?\b", text)
    if count_match is not None:
        token = count_match.group(1)
        count: int | None = int(token) if token.isdigit() else NUMBER_WORDS[token]
    else:
        count = len(set(objects)) if objects else None
    return ParsedCaption(
        colours=frozenset(w for w in words if w in vocabulary.colours),
        shapes=frozenset(w for w in words if w in shapes),
        objects=objects,
        count=count,
        relations=tuple(relations),
    )


def caption_metrics(captions: Sequence[str], facts: Sequence[SceneFacts], vocabulary: CaptionVocabulary) -> CaptionMetrics:
    """Attribute recall and relation accuracy of one generated caption per scene (module protocol)."""
    if len(captions) != len(facts) or not facts:
        raise ValueError(
            f"caption_metrics: need one caption per scene, got {len(captions)} captions for {len(facts)} scenes"
        )
    hits = {"colour": [0, 0], "shape": [0, 0], "object": [0, 0], "count": [0, 0], "relation": [0, 0]}  # [hits, facts]

    def score(kind: str, hit: bool) -> None:
        hits[kind][0] += int(hit)
        hits[kind][1] += 1

    for caption, scene in zip(captions, facts):
        parsed = parse_caption(caption, vocabulary)
        for colour in {o.colour for o in scene.objects}:
            score("colour", colour in parsed.colours)
        for shape in {o.shape for o in scene.objects}:
            score("shape", shape in parsed.shapes)
        for obj in scene.objects:
            score("object", (obj.colour, obj.shape) in parsed.objects)
        score("count", parsed.count == len(scene.objects))
        names = [(o.colour, o.shape) for o in scene.objects]
        true_relations = {(names[r.subject], r.relation, names[r.anchor]) for r in scene.relations}
        for statement in parsed.relations:
            score("relation", statement in true_relations)

    def rate(kind: str) -> float:
        hit, total = hits[kind]
        return hit / total if total else float("nan")

    attributes = [rate(kind) for kind in ("colour", "shape", "object", "count")]
    return CaptionMetrics(
        colour_recall=attributes[0],
        shape_recall=attributes[1],
        object_recall=attributes[2],
        count_accuracy=attributes[3],
        attribute_recall=float(np.nanmean(attributes)),
        relation_accuracy=rate("relation"),
        num_relations_stated=hits["relation"][1],
    )
