"""GenEval-style text -> rgb checks: renders of the prompts by the project's renderer score 1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modus_mega.data import synth
from modus_mega.eval.metrics.facts import ObjectFact, RelationFact, SceneFacts
from modus_mega.eval.metrics.geneval import ColourPalette, check_image, checkable_colours, colour_labels, geneval_score

# Adapter: the renderer's palette; the sky's zenith is its one chromatic background colour.
PALETTE = ColourPalette(colours=synth.COLOURS, background=(tuple(synth._SKY_ZENITH),))
SIZE = 96
_SIZES = {"sphere": (0.5, 0.5, 0.5), "cube": (0.45, 0.45, 0.45), "cylinder": (0.45, 0.6, 0.45)}


def _render(facts: SceneFacts) -> np.ndarray:
    """Adapter: a ground-truth render of a prompt, its objects left to right in prompt order."""
    xs = np.linspace(-1.8, 1.8, len(facts.objects)) if len(facts.objects) > 1 else [0.0]
    objects = tuple(
        synth.SceneObject(o.shape, o.colour, ("matte", "shiny")[i % 2], np.array([x, size[1], 0.0]), np.array(size), 0.3)
        for i, (o, x) in enumerate(zip(facts.objects, xs))
        for size in [_SIZES[o.shape]]
    )
    position, target = np.array([0.0, 2.2, 5.5]), np.array([0.0, 0.4, 0.0])
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    focal = (SIZE / 2) / math.tan(math.radians(50.0) / 2)
    rotation = np.stack([right, np.cross(forward, right), forward], axis=1)  # columns: right, down, forward
    camera = synth.Camera(SIZE, SIZE, focal, focal, SIZE / 2, SIZE / 2, rotation, position)
    light = np.array([0.4, 0.8, 0.45]) / np.linalg.norm([0.4, 0.8, 0.45])
    return synth.render_scene(synth.Scene(objects, camera, light)).rgb


def _prompts(rng: np.random.Generator) -> list[SceneFacts]:
    """GenEval's task kinds over checkable colours: single object, counting, two objects with a
    left/right relation, and several coloured objects."""
    colours, shapes = list(checkable_colours(PALETTE)), list(synth.SHAPES)

    def objects(names: list[str]) -> tuple[ObjectFact, ...]:
        return tuple(ObjectFact(c, shapes[int(rng.integers(len(shapes)))]) for c in names)

    prompts = []
    for _ in range(3):
        a, b, c, d = rng.choice(colours, size=4, replace=False).tolist()
        prompts += [
            SceneFacts(objects([a])),
            SceneFacts(objects([a, a, b] if rng.random() < 0.5 else [a, b, a])),
            SceneFacts(objects([a, b]), (RelationFact(0, "left of", 1),)),
            SceneFacts(objects([a, b, c]), (RelationFact(2, "right of", 0), RelationFact(1, "in front of", 2))),
            SceneFacts(objects([a, b, c, d])),
        ]
    return prompts


def test_checkable_colours_of_the_renderer() -> None:
    # orange and brown share a hue (brown is dark orange); white and black have none
    assert checkable_colours(PALETTE) == ("red", "green", "blue", "yellow", "purple", "cyan")


def test_hue_ignores_shading_and_white_highlights() -> None:
    red = np.array(synth.COLOURS["red"])
    shades = np.array([red * s + w for s, w in ((1.0, 0.0), (0.25, 0.0), (0.6, 0.2), (0.3, 0.05))])
    image = (np.clip(shades, 0, 1) ** (1 / 2.2) * 255).round().astype(np.uint8)[None]  # [1, 4, 3]
    labels, names = colour_labels(image, PALETTE)
    assert [names[i] for i in labels[0]] == ["red"] * 4
    grey = np.full((1, 1, 3), 140, dtype=np.uint8)
    assert colour_labels(grey, PALETTE)[0][0, 0] == -1


def test_hand_drawn_counts_and_positions() -> None:
    image = np.full((40, 40, 3), 120, dtype=np.uint8)  # grey: no hue
    red = (np.array(synth.COLOURS["red"]) ** (1 / 2.2) * 255).round().astype(np.uint8)
    blue = (np.array(synth.COLOURS["blue"]) ** (1 / 2.2) * 255).round().astype(np.uint8)
    image[5:15, 2:8], image[25:35, 2:8], image[10:20, 30:36] = red, red, blue  # two red left, one blue right
    image[0, 39] = blue  # one pixel: below the minimum area, not an object
    two_red = SceneFacts((ObjectFact("red", "cube"), ObjectFact("red", "sphere"), ObjectFact("blue", "cube")))
    assert check_image(image, two_red, PALETTE).correct
    one_red = SceneFacts((ObjectFact("red", "cube"), ObjectFact("blue", "cube")), (RelationFact(1, "right of", 0),))
    check = check_image(image, one_red, PALETTE)
    assert (check.colours, check.counts, check.relations) == (True, False, True)
    blue_left = SceneFacts((ObjectFact("blue", "cube"), ObjectFact("green", "cube")), (RelationFact(0, "left of", 1),))
    check = check_image(image, blue_left, PALETTE)
    assert (check.colours, check.relations) == (False, False)


def test_ground_truth_renders_score_one_and_wrong_images_do_not() -> None:
    prompts = _prompts(np.random.default_rng(0))
    renders = [_render(p) for p in prompts]
    perfect = geneval_score(renders, prompts, PALETTE)
    assert perfect.score == perfect.colour_accuracy == perfect.count_accuracy == perfect.relation_accuracy == 1.0
    mirrored = geneval_score([r[:, ::-1] for r in renders], prompts, PALETTE)
    assert mirrored.relation_accuracy == 0.0 and mirrored.count_accuracy == 1.0
    swapped = geneval_score(renders[1:] + renders[:1], prompts, PALETTE)
    assert swapped.score < 0.3
    blank = np.full_like(renders[0], 128)
    missing = [_render(SceneFacts(p.objects[:-1])) if len(p.objects) > 1 else blank for p in prompts]
    assert geneval_score(missing, prompts, PALETTE).count_accuracy == 0.0


def test_prompts_that_cannot_be_checked_are_refused() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="cannot be told apart"):
        check_image(image, SceneFacts((ObjectFact("white", "cube"),)), PALETTE)
    with pytest.raises(ValueError, match="uint8"):
        check_image(image.astype(np.float32), SceneFacts(()), PALETTE)
    same = SceneFacts((ObjectFact("red", "cube"), ObjectFact("red", "sphere")), (RelationFact(0, "left of", 1),))
    with pytest.raises(ValueError, match="unique"):
        check_image(image, same, PALETTE)
