"""Generation on the tiny model: layouts equal training's, seeds reproduce, guidance identities hold, every grammar parses."""

from __future__ import annotations

import copy

import pytest
import torch

from modus_mega.config import load_config
from modus_mega.data.documents import Document, DocumentBuilder
from modus_mega.data.procedural import procedural_sample
from modus_mega.inference.constraints import DetectionGrammar, accepts
from modus_mega.inference.generator import Generator, Settings
from modus_mega.inference.guidance import GuidanceConfig
from modus_mega.inference.token_sampling import TokenSampling
from modus_mega.tokenizers.vq import FeatureQuantizer
from tests.conftest import REPO
from tests.inference.helpers import tiny_generator

FAST = dict(steps=3, image_size=(32, 32))


@pytest.fixture(scope="module")
def generator() -> Generator:
    size = load_config(REPO / "configs" / "tiny.json").model.vocab.codebook_size
    return tiny_generator({
        "clip_global": FeatureQuantizer("clip_global", torch.randn(2, size, 8)),
        "dinov2_local": FeatureQuantizer("dinov2_local", torch.randn(1, size, 8)),
    })


@pytest.fixture(scope="module")
def sample():
    return procedural_sample(3, 32, 0)


def test_every_target_family_generates_and_parses(generator: Generator, sample) -> None:
    vocab = generator.vocab
    targets = ["caption", "depth", "detection", "grounding", "clip_global", "dinov2_local", "seg"]
    expression = [vocab.text.start + 7, vocab.text.start + 9]
    outs = generator.generate(sample, ["rgb"], targets, Settings(**FAST, sampling=TokenSampling(temperature=1.0)),
                              expressions={"grounding": expression})  # fmt: skip
    by_name = {o.name: o for o in outs.targets}
    assert by_name["depth"].image.shape == (3, 32, 32) and by_name["seg"].image.shape == (3, 32, 32)
    assert all(i in vocab.text for i in by_name["caption"].ids)
    ground = by_name["grounding"].ids
    assert ground[:2] == expression and len(ground) == 6 and all(i in vocab.coordinates for i in ground[2:])
    assert len(by_name["clip_global"].ids) == 2 and all(i in vocab.codebooks["clip_global"] for i in by_name["clip_global"].ids)
    assert len(by_name["dinov2_local"].ids) == 16
    assert accepts(DetectionGrammar(vocab, 16), by_name["detection"].ids + [vocab.end_of_segment_id])


def test_same_seed_same_outputs_and_guidance_identities(generator: Generator, sample) -> None:
    settings = Settings(**FAST, sampling=TokenSampling(temperature=1.0), seed=5)
    first = generator.generate(sample, ["rgb"], ["caption", "depth"], settings).targets
    again = generator.generate(sample, ["rgb"], ["caption", "depth"], settings).targets
    assert first[0].ids == again[0].ids and torch.equal(first[1].image, again[1].image)
    # An unconditional branch that keeps every condition is the conditional branch: any scale gives the same output
    # (up to fp32 summation order: the branches run packed in one forward, the unguided branch alone).
    same = Settings(**FAST, sampling=TokenSampling(temperature=1.0), seed=5, keep_unconditional=("rgb",),
                    guidance=GuidanceConfig(scales=(4.0,)))  # fmt: skip
    guided = generator.generate(sample, ["rgb"], ["caption", "depth"], same).targets
    assert guided[0].ids == first[0].ids
    torch.testing.assert_close(guided[1].image, first[1].image, rtol=1e-5, atol=1e-5)
    other_seed = generator.generate(sample, ["rgb"], ["depth"], Settings(**FAST, seed=6)).targets
    assert not torch.equal(other_seed[0].image, first[1].image)


def test_a_generated_target_continues_as_the_document_builder_appends_a_condition(generator: Generator, sample) -> None:
    """Chained caption, rgb -> depth -> clip_global: after each target the main branch's sequence equals the
    training document builder's sequence with that target as a condition (ids, experts, positions, runs)."""
    result = generator.generate(sample, ["caption", "rgb"], ["depth", "clip_global"], Settings(**FAST, chain=True))
    depth, clip = result.targets
    generated = copy.deepcopy(sample)
    generated.images["depth"] = depth.image
    builder = DocumentBuilder(generator.data, None, generator.model.cfg, generator.vocab)  # type: ignore[arg-type]
    expected = Document(key=sample.key, target="")
    for name in ("caption", "rgb", "depth"):
        builder.add_condition(expected, generated, name)
    builder.add_marker(expected, "clip_global")
    builder.add_condition_content(expected, "clip_global", clip.ids, None)
    for field in ("input_ids", "token_type", "position_ids", "modality_ids", "layout"):
        assert getattr(result.document, field) == getattr(expected, field), field
    assert torch.equal(result.document.vae_images[-1], depth.image)


def test_unknown_target_and_missing_expression_are_clear(generator: Generator, sample) -> None:
    with pytest.raises(ValueError, match="unknown modality 'heatmap'"):
        generator.generate(sample, ["rgb"], ["heatmap"], Settings(**FAST))
    with pytest.raises(ValueError, match="referring expression"):
        generator.generate(sample, ["rgb"], ["grounding"], Settings(**FAST))
