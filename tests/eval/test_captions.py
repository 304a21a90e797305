"""Caption metrics: hand-computed parses and scores; the synthetic generator's own captions score 1."""

from __future__ import annotations

import numpy as np
import pytest

from modus_mega.data import synth
from modus_mega.eval.metrics.captions import CaptionVocabulary, caption_metrics, parse_caption
from modus_mega.eval.metrics.facts import ObjectFact, RelationFact, SceneFacts

VOCABULARY = CaptionVocabulary(colours=tuple(synth.COLOURS), shapes=synth.SHAPES)
THREE = SceneFacts(
    objects=(ObjectFact("red", "sphere"), ObjectFact("blue", "cube"), ObjectFact("green", "cylinder")),
    relations=(RelationFact(0, "left of", 1), RelationFact(1, "right of", 0)),
)


def _synth_scene(index: int) -> tuple[list[str], SceneFacts]:
    """Adapter: a generated sample's captions and the facts of its visible objects."""
    scene, rendering, values = synth.generate_sample(index, synth.SynthConfig(image_size=64), encoders=[])
    visible = synth.visible_objects(scene, rendering)
    relations = tuple(
        RelationFact(i, synth.relation(a, b, rendering.rgb.shape[1]), j)
        for i, a in enumerate(visible)
        for j, b in enumerate(visible)
        if i != j
    )
    return values["caption"], SceneFacts(tuple(ObjectFact(v.obj.colour, v.obj.shape) for v in visible), relations)


def test_parse_by_hand() -> None:
    parsed = parse_caption("Three objects: a shiny Red sphere left of the blue cubes, and green.", VOCABULARY)
    assert parsed.colours == {"red", "blue", "green"} and parsed.shapes == {"sphere", "cube"}
    assert parsed.objects == (("red", "sphere"), ("blue", "cube"))
    assert parsed.count == 3
    assert parsed.relations == ((("red", "sphere"), "left of", ("blue", "cube")),)
    chained = parse_caption("a red sphere left of a blue cube behind a green cylinder", VOCABULARY)
    assert [r[1] for r in chained.relations] == ["left of", "behind"]
    assert parse_caption("a red sphere and a red sphere", VOCABULARY).count == 1  # distinct objects named


def test_scores_by_hand() -> None:
    # colours 2/3, shapes 1/3, objects 1/3 (red sphere), count 2 named != 3
    m = caption_metrics(["a red sphere and a blue sphere."], [THREE], VOCABULARY)
    assert (m.colour_recall, m.shape_recall, m.object_recall, m.count_accuracy) == pytest.approx((2 / 3, 1 / 3, 1 / 3, 0.0))
    assert m.attribute_recall == pytest.approx(1 / 3)
    assert np.isnan(m.relation_accuracy) and m.num_relations_stated == 0
    # one true and one false relation; "three objects" is the count
    caption = "three objects: a red sphere left of a blue cube, a blue cube left of a red sphere."
    m = caption_metrics([caption], [THREE], VOCABULARY)
    assert m.relation_accuracy == 0.5 and m.num_relations_stated == 2 and m.count_accuracy == 1.0
    empty = caption_metrics(["no objects on a checkered floor."], [SceneFacts(())], VOCABULARY)
    assert empty.count_accuracy == 1.0 and empty.attribute_recall == 1.0


def test_generated_captions_score_perfectly_and_other_scenes_captions_do_not() -> None:
    scenes = [_synth_scene(i) for i in range(12)]
    scenes = [(captions, facts) for captions, facts in scenes if facts.objects]
    facts = [f for _, f in scenes]
    for which in (0, 1):  # the listing captions name every visible object
        m = caption_metrics([c[which] for c, _ in scenes], facts, VOCABULARY)
        assert (m.colour_recall, m.shape_recall, m.object_recall, m.count_accuracy) == (1.0, 1.0, 1.0, 1.0)
    relation_captions = [(c, f) for captions, f in scenes for c in captions[2:]]
    assert len(relation_captions) >= 5
    m = caption_metrics([c for c, _ in relation_captions], [f for _, f in relation_captions], VOCABULARY)
    assert m.relation_accuracy == 1.0 and m.num_relations_stated == len(relation_captions)
    # every caption read against the next scene's facts
    shifted = caption_metrics([c[0] for c, _ in scenes[1:] + scenes[:1]], facts, VOCABULARY)
    assert shifted.attribute_recall < 0.6
    misplaced = [(c, facts[(k + 1) % len(facts)]) for k, (captions, _) in enumerate(scenes) for c in captions[2:]]
    assert caption_metrics([c for c, _ in misplaced], [f for _, f in misplaced], VOCABULARY).relation_accuracy < 0.5
