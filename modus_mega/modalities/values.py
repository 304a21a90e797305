"""The decoded value types of the 1D annotation modalities, shared by readers, augmentation and tokenizers.

They sit with the modality table (below ``data/`` and ``tokenizers/``) so both import them
without importing each other. 2D maps and features are plain ``np.ndarray``s; captions are
``list[str]``.

Shapes: N boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np


@dataclass
class Detections:
    """Boxes of one image in pixel coordinates; pixel (i, j) covers [j, j+1) x [i, i+1)."""

    boxes: np.ndarray  # [N, 4] float32, x0 y0 x1 y1 in pixels, x0 <= x1, y0 <= y1
    classes: list[str]  # [N] class names
    scores: np.ndarray  # [N] float32 confidence (1.0 for ground truth)
    width: int  # image width the boxes refer to
    height: int  # image height the boxes refer to


@dataclass
class Groundings:
    """Referring expressions of one image, each with the pixel box it refers to."""

    boxes: np.ndarray  # [N, 4] float32, x0 y0 x1 y1 in pixels
    expressions: list[str]  # [N] referring expressions
    width: int  # image width the boxes refer to
    height: int  # image height the boxes refer to


Payload = Union[np.ndarray, list[str], Detections, Groundings]
