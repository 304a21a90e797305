"""Detection and grounding as tokens: 4 coordinate tokens per box, then text (Pix2Seq / 4M style).

A box becomes ``x0 y0 x1 y1``, each coordinate normalised to [0, 1] by the image width or
height and quantised into ``coordinate_bins`` equal bins: bin ``floor(c * B)`` (clamped to
``B - 1``), whose id is ``vocab.coordinates.start + bin``. Decoding returns the bin centre
``(bin + 0.5) / B``, so a round trip moves a coordinate by at most half a bin.

- detection: boxes sorted by the distance of their (x0, y0) corner to the image origin in
  normalised coordinates (ties: y0, then x0), each followed by its class name as text tokens.
- grounding: the referring expression as text tokens, then its box.

Coordinate and text ids live in disjoint ranges, so a sequence parses without separators.
Encoders return the segment's content only: the document builder adds ``<start:...>`` before
and ``end_of_segment`` after. Decoders stop at ``end_of_segment`` if present and drop
malformed groups (a coordinate run that is not exactly 4 long), so generated sequences can
always be scored; ids outside the text and coordinate ranges raise ``ValueError``.

Shapes: N boxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modus_mega.modalities.values import Detections, Groundings
from modus_mega.tokenizers.text import TextTokenizer
from modus_mega.vocab import Vocabulary


def quantize_coordinates(coords: np.ndarray, num_bins: int) -> np.ndarray:
    """Normalised coordinates in [0, 1] (any shape) -> int64 bins in [0, num_bins)."""
    return np.clip(np.floor(np.asarray(coords, dtype=np.float64) * num_bins), 0, num_bins - 1).astype(np.int64)


def dequantize_coordinates(bins: np.ndarray, num_bins: int) -> np.ndarray:
    """Bins (any shape) -> float32 normalised coordinates at the bin centres."""
    return ((np.asarray(bins, dtype=np.float64) + 0.5) / num_bins).astype(np.float32)


def _scale(width: int, height: int) -> np.ndarray:
    return np.array([width, height, width, height], dtype=np.float64)


def detection_order(boxes_norm: np.ndarray) -> np.ndarray:
    """Indices sorting normalised boxes [N, 4] by |(x0, y0)|, then y0, then x0."""
    distance = np.hypot(boxes_norm[:, 0], boxes_norm[:, 1])
    return np.lexsort((boxes_norm[:, 0], boxes_norm[:, 1], distance))


class BoxTokenizer:
    """Boxes (with class names or referring expressions) <-> ids of one extended vocabulary."""

    def __init__(self, vocab: Vocabulary, text: TextTokenizer) -> None:
        self.vocab = vocab
        self.text = text
        self.num_bins = len(vocab.coordinates)

    def encode_boxes(self, boxes: np.ndarray, width: int, height: int) -> list[int]:
        """Pixel boxes [N, 4] xyxy of a width x height image -> 4N coordinate ids."""
        normalised = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / _scale(width, height)
        return (quantize_coordinates(normalised, self.num_bins) + self.vocab.coordinates.start).ravel().tolist()

    def decode_boxes(self, ids: Sequence[int], width: int, height: int) -> np.ndarray:
        """4N coordinate ids -> float32 pixel boxes [N, 4] at the bin centres."""
        bins = np.asarray(ids, dtype=np.int64).reshape(-1, 4) - self.vocab.coordinates.start
        if ((bins < 0) | (bins >= self.num_bins)).any():
            raise ValueError(f"ids {list(ids)} are not all coordinate ids {self.vocab.coordinates}")
        return (dequantize_coordinates(bins, self.num_bins) * _scale(width, height)).astype(np.float32)

    def encode_detections(self, detections: Detections, min_score: float = 0.0) -> list[int]:
        """Boxes with score >= ``min_score``, sorted by corner distance, each then its class text."""
        keep = np.nonzero(detections.scores >= min_score)[0]
        boxes = detections.boxes[keep].astype(np.float64)
        normalised = boxes / _scale(detections.width, detections.height)
        ids: list[int] = []
        for i in detection_order(normalised):
            ids += self.encode_boxes(boxes[i], detections.width, detections.height)
            ids += self.text.encode(" " + detections.classes[keep[i]])
        return ids

    def decode_detections(self, ids: Sequence[int], width: int, height: int) -> Detections:
        """Parse ``[4 coordinates, class text]*``; scores are 1. Malformed groups are dropped."""
        boxes: list[np.ndarray] = []
        classes: list[str] = []
        for coords, text in self._groups(ids):
            if len(coords) == 4:
                boxes.append(self.decode_boxes(coords, width, height)[0])
                classes.append(self.text.decode(text).strip())
        return Detections(
            boxes=np.stack(boxes) if boxes else np.zeros((0, 4), np.float32),
            classes=classes,
            scores=np.ones(len(boxes), dtype=np.float32),
            width=width,
            height=height,
        )

    def encode_grounding(self, expression: str, box: np.ndarray, width: int, height: int) -> list[int]:
        """The expression as text ids, then its pixel box [4] as 4 coordinate ids."""
        return self.text.encode(expression) + self.encode_boxes(box, width, height)

    def decode_grounding(self, ids: Sequence[int], width: int, height: int) -> tuple[str, np.ndarray | None]:
        """(expression, pixel box [4] or None if no complete box follows the text)."""
        ids = self._until_end(ids)
        first_coord = next((k for k, i in enumerate(ids) if i in self.vocab.coordinates), len(ids))
        self._check(ids)
        expression = self.text.decode(ids[:first_coord]).strip()
        coords = [i for i in ids[first_coord : first_coord + 4] if i in self.vocab.coordinates]
        box = self.decode_boxes(coords, width, height)[0] if len(coords) == 4 else None
        return expression, box

    def encode_groundings(self, groundings: Groundings, index: int) -> list[int]:
        """Tokens of phrase ``index`` of a ``Groundings`` payload (one phrase per document)."""
        return self.encode_grounding(
            groundings.expressions[index], groundings.boxes[index], groundings.width, groundings.height
        )

    def _until_end(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        return ids[: ids.index(self.vocab.end_of_segment_id)] if self.vocab.end_of_segment_id in ids else ids

    def _check(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if i not in self.vocab.coordinates and i not in self.vocab.text]
        if bad:
            raise ValueError(f"ids {bad[:8]} are neither text {self.vocab.text} nor coordinates {self.vocab.coordinates}")

    def _groups(self, ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """Split into (coordinate run, following text run) pairs; leading text is dropped."""
        ids = self._until_end(ids)
        self._check(ids)
        groups: list[tuple[list[int], list[int]]] = []
        for token in ids:
            if token in self.vocab.coordinates:
                if not groups or groups[-1][1]:
                    groups.append(([], []))
                groups[-1][0].append(token)
            elif groups:
                groups[-1][1].append(token)
        return groups
