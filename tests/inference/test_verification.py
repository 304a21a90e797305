"""Self-verification on the tiny model: caption claims, both verifiers, best-of-N's choice and scores."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from modus_mega.data.documents import Document, Sample
from modus_mega.data.procedural import procedural_sample
from modus_mega.datasets.synth import SynthConfig, generate_sample
from modus_mega.inference.generator import GeneratedTarget, Generator, Settings
from modus_mega.inference.sequence import Sequence
from modus_mega.inference.verification import (
    CaptionClaims,
    GroundingVerifier,
    LikelihoodVerifier,
    best_of_n,
    caption_claims,
)
from modus_mega.ops.attention_reference import ReferenceAttention
from modus_mega.ops.mask import lo_hi_for_layout
from modus_mega.tokenizers.text import TextTokenizer, train_tiny_text_tokenizer
from tests.inference.helpers import tiny_generator

FAST = dict(steps=2, image_size=(32, 32))
CAPTION = "a red sphere left of a blue cube."


@pytest.fixture(scope="module")
def generator() -> Generator:
    return tiny_generator()


@pytest.fixture(scope="module")
def text(generator: Generator, tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    texts = [CAPTION, "the red sphere", "the blue cube", "two objects: red sphere and blue cube."]
    directory = train_tiny_text_tokenizer(texts, len(generator.vocab.text), tmp_path_factory.mktemp("tok"))
    return TextTokenizer.from_pretrained(directory, generator.vocab)


@pytest.fixture(scope="module")
def sample():
    return procedural_sample(3, 32, 0)


def test_caption_claims_read_every_form_of_the_synthetic_captions() -> None:
    assert caption_claims("a matte red sphere, a shiny blue cube and a matte green cylinder on a checkered floor.") == \
        CaptionClaims(("the red sphere", "the blue cube", "the green cylinder"), ())  # fmt: skip
    assert caption_claims("two objects: red sphere and blue cube.") == CaptionClaims(("the red sphere", "the blue cube"), ())
    assert caption_claims("a red sphere in front of an orange cylinder.") == \
        CaptionClaims(("the red sphere", "the orange cylinder"), ((0, "in front of", 1),))  # fmt: skip
    assert caption_claims("an empty checkered floor under the sky.") == CaptionClaims((), ())
    for index in range(6):  # the generator's own captions name exactly its visible objects' phrases
        scene, _, payloads = generate_sample(index, SynthConfig(image_size=32))
        names = {f"the {o.name}" for o in scene.objects}
        for caption in payloads["caption"]:
            claims = caption_claims(caption)
            assert set(claims.objects) <= names, caption
            assert len(claims.relations) == (" of " in caption or " behind " in caption), caption


def test_grounding_checks_compare_the_boxes(generator: Generator, text: TextTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    candidate = GeneratedTarget("rgb", image=torch.zeros(3, 32, 32))
    verifier = GroundingVerifier(CAPTION, text)
    left, right = torch.tensor([0.0, 0, 10, 10]), torch.tensor([20.0, 0, 30, 10])
    monkeypatch.setattr(GroundingVerifier, "boxes", lambda self, g, c, phrases: [left, right])
    assert verifier.score(generator, candidate) == 1.0
    monkeypatch.setattr(GroundingVerifier, "boxes", lambda self, g, c, phrases: [right, torch.tensor([5.0, 5, 5, 9])])
    assert verifier.score(generator, candidate) == pytest.approx(1 / 3)  # the sphere found; no cube; wrong side


def test_grounding_verifier_runs_the_model_for_each_phrase(generator: Generator, text: TextTokenizer, sample) -> None:
    verifier = GroundingVerifier(CAPTION, text)
    boxes = verifier.boxes(generator, GeneratedTarget("rgb", image=sample.images["rgb"]), ("the red sphere", "the blue cube"))
    assert len(boxes) == 2 and all(b.shape == (4,) and 0 <= b[0] <= b[2] <= 32 for b in boxes)
    assert verifier.score(generator, GeneratedTarget("rgb", image=sample.images["rgb"])) in (0.0, 1 / 3, 2 / 3, 1.0)


def test_likelihood_verifier_equals_the_full_sequence_log_probability(generator: Generator, text: TextTokenizer, sample) -> None:
    """The oracle: one full forward of [rgb condition, <start:caption>, caption] without any cache."""
    ids = text.encode(CAPTION)
    candidate = GeneratedTarget("rgb", image=sample.images["rgb"])
    score = LikelihoodVerifier(ids).score(generator, candidate)

    doc = Document(key="oracle", target="")
    generator.builder.add_condition(doc, Sample("oracle", images={"rgb": candidate.image}), "rgb")
    start = len(doc)
    generator.builder.add_marker(doc, "caption")
    generator.builder.add_condition_content(doc, "caption", ids, None)
    inputs = generator.runner._inputs(Sequence(doc), 0)
    inputs.attn_lo, inputs.attn_hi = lo_hi_for_layout([doc.layout])
    with torch.no_grad():
        logits, _ = generator.model(inputs, torch.arange(start, len(doc)), torch.zeros(0, dtype=torch.long), ReferenceAttention())
    targets = torch.tensor(ids + [generator.vocab.end_of_segment_id])
    expected = float(torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).sum())
    assert score == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert score < 0 and LikelihoodVerifier(ids[:-1]).score(generator, candidate) != pytest.approx(score)


@dataclass
class ScriptedVerifier:
    """Scores candidates in order from a fixed list (the model's choice is then known)."""

    scores: list[float]

    def score(self, generator: Generator, candidate: GeneratedTarget) -> float:
        assert candidate.image is not None
        return self.scores.pop(0)


def test_best_of_n_returns_every_score_and_the_first_best(generator: Generator, sample) -> None:
    settings = Settings(**FAST, seed=3)
    tie = best_of_n(generator, sample, ["rgb"], "depth", settings, 3, ScriptedVerifier([0.5, 0.9, 0.9]))
    assert tie.scores == [0.5, 0.9, 0.9] and tie.best == 1 and tie.generation is tie.candidates[1]
    assert best_of_n(generator, sample, ["rgb"], "depth", settings, 3, ScriptedVerifier([0.2, 0.2, 0.2])).best == 0
    images = [c.targets[0].image for c in tie.candidates]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])  # a seed per candidate
    one = best_of_n(generator, sample, ["rgb"], "depth", settings, 1, ScriptedVerifier([0.1]))
    plain = generator.generate(sample, ["rgb"], ["depth"], settings)
    assert one.best == 0 and torch.equal(one.generation.targets[0].image, plain.targets[0].image)
    with pytest.raises(ValueError, match="at least one candidate"):
        best_of_n(generator, sample, ["rgb"], "depth", settings, 0, ScriptedVerifier([]))
