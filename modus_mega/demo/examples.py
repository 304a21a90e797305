"""Example inputs of the demo, rendered at start-up by the project's synthetic renderer.

No binary file is kept in git: each example is sample ``i`` of ``datasets/synth.py`` (a ray
traced scene, its rgb and first caption), written as a PNG into a directory the demo owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from modus_mega.datasets.synth import SynthConfig, generate_sample

NUM_EXAMPLES = 3  # pictures offered under the form


@dataclass(frozen=True)
class Example:
    """One example input: a rendered scene's picture and its caption."""

    image: Path
    caption: str


def write_examples(out_dir: Path, size: int, count: int = NUM_EXAMPLES) -> list[Example]:
    """Render ``count`` synthetic scenes of ``size`` px into ``out_dir``; returns them in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = SynthConfig(image_size=size)
    examples = []
    for index in range(count):
        _, _, values = generate_sample(index, config, encoders=[])  # no features: the demo shows pictures
        path = out_dir / f"example_{index}.png"
        Image.fromarray(values["rgb"]).save(path)
        examples.append(Example(path, values["caption"][0]))
    return examples
