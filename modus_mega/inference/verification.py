"""Self-verification: best-of-N candidates of a target, each scored by the model itself through another modality.

``best_of_n`` generates N candidates of one target from the same conditions, candidate i
with its own seed (candidate 0 keeps the request's seed, so best-of-1 IS plain generation;
candidate i > 0 uses ``derive_seed("best-of-n", seed, i)``), scores each with a verifier and
returns the best (ties to the lowest index) with every score. Two verifiers read a prompt
caption and the candidate image (which enters as a condition of its own modality):

- ``GroundingVerifier``: the caption is split into claims (``caption_claims``): the objects it
  names and the relations between them. For each object the model generates its box
  (a grounding target with the object's phrase as the forced expression); each object whose
  box has a positive area passes, and each relation passes when the boxes agree: "left of" /
  "right of" compare the boxes' centres in x, "in front of" / "behind" their bottom edges
  (on a floor seen from above, a nearer object reaches lower in the image). Score = the
  fraction of checks passed (1 when the caption claims nothing).
- ``LikelihoodVerifier``: the teacher-forced log-probability of the caption's tokens and its
  end token after ``[candidate as condition, <start:caption>]``: one forward of the caption
  over the cache, no sampling.

Shapes: V vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from modus_mega.data.documents import Document, Sample
from modus_mega.datasets.synth import SHAPES
from modus_mega.inference.generator import GeneratedTarget, Generation, Generator, Settings
from modus_mega.inference.sequence import Sequence
from modus_mega.seeding import derive_seed
from modus_mega.tokenizers.boxes import BoxTokenizer
from modus_mega.tokenizers.text import TextTokenizer

RELATIONS: tuple[str, ...] = ("left of", "right of", "in front of", "behind")  # the synthetic captions' relations
_LIST_SUFFIX = " on a checkered floor"  # the object list caption's ending
_ARTICLES = ("a", "an", "the")


@dataclass(frozen=True)
class CaptionClaims:
    """What a caption asserts: the objects it names and the relations between them."""

    objects: tuple[str, ...]  # referring phrases as grounding expressions ("the red sphere"), first mention order
    relations: tuple[tuple[int, str, int], ...]  # (subject object index, one of RELATIONS, anchor object index)


def caption_claims(caption: str) -> CaptionClaims:
    """Claims of a caption in the synthetic captions' grammar (``datasets/synth.py`` ``describe``).

    Three forms: an object list ("a matte red sphere and a shiny blue cube on a checkered
    floor."), a count ("two objects: red sphere and blue cube."), and a relation ("a red sphere
    left of a blue cube."). An object is "[article] [material] colour shape" with a shape of
    ``SHAPES``; its phrase is "the colour shape", the grounding expressions' form. Anything
    else (an empty scene) claims nothing.
    """
    text = caption.strip().rstrip(".").strip()
    text = text.removesuffix(_LIST_SUFFIX).split(":")[-1].strip()
    for relation in RELATIONS:
        subject, found, anchor = text.partition(f" {relation} ")
        if found:
            objects = [_object_phrase(subject), _object_phrase(anchor)]
            if None not in objects:
                return CaptionClaims(tuple(objects), ((0, relation, 1),))  # type: ignore[arg-type]
    phrases = [_object_phrase(item) for item in re.split(r",\s*|\s+and\s+", text)]
    unique = tuple(dict.fromkeys(p for p in phrases if p is not None))
    return CaptionClaims(unique, ())


def _object_phrase(item: str) -> str | None:
    """"the colour shape" of an object mention, or None if ``item`` names no object."""
    words = [w for w in item.split() if w not in _ARTICLES]
    if len(words) < 2 or words[-1] not in SHAPES:
        return None
    return f"the {words[-2]} {words[-1]}"


class Verifier(Protocol):
    """Scores one candidate of a target: higher is better."""

    def score(self, generator: Generator, candidate: GeneratedTarget) -> float:
        """The candidate's score under this verifier's prompt."""
        ...


@dataclass
class GroundingVerifier:
    """Fraction of a caption's claims that the model's own boxes on the candidate confirm."""

    caption: str
    text: TextTokenizer
    settings: Settings = field(default_factory=Settings)  # how each box is generated (greedy by default)

    def boxes(self, generator: Generator, candidate: GeneratedTarget, phrases: tuple[str, ...]) -> list[torch.Tensor]:
        """The pixel box [4] xyxy the model grounds each phrase to on the candidate image."""
        image = _image_of(candidate)
        height, width = image.shape[1:]
        condition = Sample(key="candidate", images={candidate.name: image})
        decoder = BoxTokenizer(generator.vocab, self.text)
        boxes = []
        for phrase in phrases:
            expression = self.text.encode(phrase)
            generated = generator.generate(condition, [candidate.name], ["grounding"], self.settings, {"grounding": expression})
            ids = generated.targets[0].ids  # the forced expression, then 4 coordinate ids
            boxes.append(torch.from_numpy(decoder.decode_boxes(ids[len(expression) :], width, height)[0]))
        return boxes

    def score(self, generator: Generator, candidate: GeneratedTarget) -> float:
        """Passed checks / all checks (each object: a box of positive area; each relation: the boxes agree)."""
        claims = caption_claims(self.caption)
        if not claims.objects:
            return 1.0
        boxes = self.boxes(generator, candidate, claims.objects)
        checks = [bool(b[2] > b[0] and b[3] > b[1]) for b in boxes]
        checks += [_relation_holds(boxes[s], relation, boxes[a]) for s, relation, a in claims.relations]
        return sum(checks) / len(checks)


def _relation_holds(subject: torch.Tensor, relation: str, anchor: torch.Tensor) -> bool:
    """Whether pixel boxes [4] xyxy agree with "subject <relation> anchor"."""
    if relation in ("left of", "right of"):
        subject_x, anchor_x = float(subject[0] + subject[2]), float(anchor[0] + anchor[2])  # centres, times 2
        return subject_x < anchor_x if relation == "left of" else subject_x > anchor_x
    subject_y, anchor_y = float(subject[3]), float(anchor[3])  # bottom edges
    return subject_y > anchor_y if relation == "in front of" else subject_y < anchor_y


@dataclass
class LikelihoodVerifier:
    """Teacher-forced log-probability of a caption (its ids, then the end token) given the candidate."""

    caption_ids: list[int]  # text ids of the prompt caption (no marker, no end token)
    caption_modality: str = "caption"

    def score(self, generator: Generator, candidate: GeneratedTarget) -> float:
        """``sum_i log p(caption_i | candidate, caption_<i)`` plus ``log p(end | ...)``, from one cached forward."""
        condition = Sample(key="candidate", images={candidate.name: _image_of(candidate)})
        doc = Document(key=condition.key, target="")
        generator.builder.add_condition(doc, condition, candidate.name)
        seq = Sequence(doc)
        generator.runner.flush(seq)  # the context: the candidate as a condition
        generator.builder.add_marker(doc, self.caption_modality)
        generator.builder.add_condition_content(doc, self.caption_modality, self.caption_ids, None)
        logits = generator.runner.flush_scoring(seq).float()  # [1 + len(ids), V]: the marker, then every caption token
        targets = torch.tensor(self.caption_ids + [generator.vocab.end_of_segment_id], device=logits.device)
        return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())


def _image_of(candidate: GeneratedTarget) -> torch.Tensor:
    """The candidate's image [3, H, W]; a verifier scores 2D candidates."""
    if candidate.image is None:
        raise ValueError(f"self-verification scores generated images; the {candidate.name} target is 1D")
    return candidate.image


@dataclass
class Verified:
    """Best-of-N: every candidate's generation and score, and the index of the best."""

    candidates: list[Generation]
    scores: list[float]
    best: int

    @property
    def generation(self) -> Generation:
        """The best candidate's generation."""
        return self.candidates[self.best]


def candidate_seed(seed: int, index: int) -> int:
    """Candidate ``index``'s seed: the request's own for candidate 0, a derived one after it."""
    return seed if index == 0 else derive_seed("best-of-n", seed, index)


def best_of_n(
    generator: Generator, conditions: Sample, order: list[str], target: str, settings: Settings, num_candidates: int,
    verifier: Verifier, expressions: dict[str, list[int]] | None = None,
) -> Verified:  # fmt: skip
    """Generate ``num_candidates`` candidates of ``target`` and keep the one ``verifier`` scores highest.

    Ties go to the lowest index; all scores are returned.
    """
    if num_candidates < 1:
        raise ValueError(f"best-of-N needs at least one candidate, got {num_candidates}; --best-of 1 is plain generation")
    candidates = [
        generator.generate(conditions, order, [target], replace(settings, seed=candidate_seed(settings.seed, i)), expressions)
        for i in range(num_candidates)
    ]  # fmt: skip
    scores = [verifier.score(generator, c.targets[0]) for c in candidates]
    best = scores.index(max(scores))  # the first of the highest: ties to the lowest index
    return Verified(candidates, scores, best)
