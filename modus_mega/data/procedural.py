"""A small in-memory dataset of procedural scenes for CPU runs and tests.

Each sample is 1-3 coloured shapes (square or disc) on a dark background: an ``rgb``
image, a ``seg`` map (shape class as a palette colour) and a ``caption`` such as
"red disc top left . blue square bottom right" tokenized word by word into the text
range of the vocabulary. The caption is a deterministic function of the images and
vice versa (up to exact sizes), so a model can learn both directions quickly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modus_mega.data.documents import Sample

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.2, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "disc")
SEG_PALETTE = {"background": (-1.0, -1.0, -1.0), "square": (1.0, -1.0, 1.0), "disc": (-1.0, 1.0, 1.0)}
ROWS, COLS = ("top", "bottom"), ("left", "right")
WORDS: tuple[str, ...] = (".", *COLOURS, *SHAPES, *ROWS, *COLS)
WORD_ID = {w: i for i, w in enumerate(WORDS)}


def _draw(size: int, cells: list[tuple[int, int, str, str]], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Render shapes into quadrant cells; returns (rgb, seg) images [3, size, size] in [-1, 1]."""
    rgb = torch.full((3, size, size), -0.8)
    seg = torch.tensor(SEG_PALETTE["background"])[:, None, None].repeat(1, size, size)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    half = size // 2
    for row, col, colour, shape in cells:
        radius = half * (0.25 + 0.15 * float(torch.rand((), generator=generator)))
        cy, cx = row * half + half / 2, col * half + half / 2
        if shape == "square":
            inside = ((ys - cy).abs() <= radius) & ((xs - cx).abs() <= radius)
        else:
            inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
        rgb[:, inside] = (torch.tensor(COLOURS[colour]) * 2 - 1)[:, None]
        seg[:, inside] = torch.tensor(SEG_PALETTE[shape])[:, None]
    return rgb, seg


def procedural_sample(index: int, image_size: int, seed: int) -> Sample:
    """Sample ``index`` of the procedural dataset (a pure function of its arguments)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    num_shapes = int(torch.randint(1, 4, (1,), generator=generator))
    quadrants = torch.randperm(4, generator=generator)[:num_shapes].sort().values.tolist()
    cells, words = [], []
    for q in quadrants:
        row, col = divmod(q, 2)
        colour = list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=generator))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=generator))]
        cells.append((row, col, colour, shape))
        words += [colour, shape, ROWS[row], COLS[col], "."]
    rgb, seg = _draw(image_size, cells, generator)
    return Sample(
        key=f"procedural-{index:08d}",
        images={"rgb": rgb, "seg": seg},
        tokens={"caption": [WORD_ID[w] for w in words]},
    )


def decode_caption(ids: list[int]) -> str:
    """Token ids back to words (ids outside the word list print as <id>)."""
    return " ".join(WORDS[i] if 0 <= i < len(WORDS) else f"<{i}>" for i in ids)
