"""What a 1D target may emit next: one small grammar per tokenizer kind, over the vocabulary's id ranges.

A grammar looks at the content generated so far (ids after ``<start:m>``) and returns the
boolean mask [V] of allowed next ids; ``<end_of_segment>`` closes the segment. Sampling
never leaves the mask (``inference/token_sampling.py``), so every generated segment parses
with the modality's own decoder (``tokenizers``), and every grammar also bounds the length,
so generation always ends.

- text (caption): text ids, then ``<end_of_segment>`` (after at least one token);
- detection: ``[x0 y0 x1 y1, class text+]*`` — 4 coordinate tokens, then at least one text token
  (at most ``max_class_tokens``), then another box or the end; at most ``max_boxes`` boxes;
- grounding: the given expression's ids, forced, then exactly 4 coordinate tokens, then the end;
- in both, a box's far corner is never before its near one (x1 >= x0, y1 >= y0 in bins);
- features: exactly the modality's fixed number of codebook ids (global: the quantizer's stages;
  local: one per patch of the grid), then the end.

Text ids exclude the vision markers when the vocabulary reuses text ids for them (7B does).
Shapes: V padded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modus_mega.vocab import IdRange, Vocabulary


def _mask(vocab: Vocabulary, *ranges: IdRange, ids: tuple[int, ...] = ()) -> Tensor:
    """Bool [V]: True on every id of ``ranges`` and ``ids``."""
    mask = torch.zeros(vocab.padded_size, dtype=torch.bool)
    for r in ranges:
        mask[r.start : r.stop] = True
    mask[list(ids)] = True
    return mask


def _text_mask(vocab: Vocabulary) -> Tensor:
    """Bool [V] over the text vocabulary minus the vision markers (never content of a 1D segment)."""
    mask = _mask(vocab, vocab.text)
    mask[[vocab.vision_start_id, vocab.vision_end_id]] = False
    return mask


def _box_coordinate_mask(vocab: Vocabulary, box_so_far: list[int]) -> Tensor:
    """Bool [V]: the coordinate ids allowed as the next corner value of a box (x1 >= x0, y1 >= y0)."""
    low = box_so_far[len(box_so_far) - 2] if len(box_so_far) >= 2 else vocab.coordinates.start
    return _mask(vocab, IdRange(low, vocab.coordinates.stop))


@dataclass
class Grammar:
    """The masks of one 1D target's segment; subclasses decide which applies after a prefix."""

    vocab: Vocabulary

    def allowed(self, content: list[int]) -> Tensor:
        """Bool [V] of the ids allowed after ``content`` (the segment's ids so far, no end yet)."""
        raise NotImplementedError

    def end_only(self) -> Tensor:
        """Bool [V]: only ``<end_of_segment>``."""
        return _mask(self.vocab, ids=(self.vocab.end_of_segment_id,))


@dataclass
class TextGrammar(Grammar):
    """Captions: at least one text token, at most ``max_tokens``, then the end."""

    max_tokens: int = 64

    def allowed(self, content: list[int]) -> Tensor:
        if len(content) >= self.max_tokens:
            return self.end_only()
        mask = _text_mask(self.vocab)
        if content:
            mask[self.vocab.end_of_segment_id] = True
        return mask


@dataclass
class DetectionGrammar(Grammar):
    """``[4 coordinates, 1..max_class_tokens text ids]*``, at most ``max_boxes`` boxes, then the end."""

    max_boxes: int = 16
    max_class_tokens: int = 8

    def allowed(self, content: list[int]) -> Tensor:
        coords, text, boxes = self._state(content)
        vocab = self.vocab
        if 0 < coords < 4:  # inside a box
            return _box_coordinate_mask(vocab, content[len(content) - coords :])
        if coords == 4:  # a box is complete: its class must follow
            return _text_mask(vocab)
        # at the start, or after a class token
        mask = _text_mask(vocab) if 0 < text < self.max_class_tokens else torch.zeros(vocab.padded_size, dtype=torch.bool)
        if boxes < self.max_boxes:
            mask |= _mask(vocab, vocab.coordinates)
        mask[vocab.end_of_segment_id] = True
        return mask

    def _state(self, content: list[int]) -> tuple[int, int, int]:
        """(coordinates of the box in progress, text ids after the last box, boxes started)."""
        coords = text = boxes = 0
        for token in content:
            if token in self.vocab.coordinates:
                if coords == 0 or text:
                    boxes, coords, text = boxes + 1, 0, 0
                coords += 1
            else:
                text += 1
        return (coords if not text else 0), text, boxes


@dataclass
class GroundingGrammar(Grammar):
    """The given expression (forced), exactly 4 coordinate ids, then the end."""

    expression: tuple[int, ...] = ()

    def allowed(self, content: list[int]) -> Tensor:
        n = len(self.expression)
        if len(content) < n:
            return _mask(self.vocab, ids=(self.expression[len(content)],))
        if len(content) < n + 4:
            return _box_coordinate_mask(self.vocab, content[n:])
        return self.end_only()


@dataclass
class FeatureGrammar(Grammar):
    """Exactly ``num_tokens`` ids of one codebook, then the end."""

    codebook: IdRange = IdRange(0, 0)
    num_tokens: int = 1

    def allowed(self, content: list[int]) -> Tensor:
        if len(content) < self.num_tokens:
            return _mask(self.vocab, self.codebook)
        return self.end_only()


def accepts(grammar: Grammar, ids: list[int]) -> bool:
    """Whether ``grammar`` could have generated ``ids`` (content, then ``<end_of_segment>``)."""
    end = grammar.vocab.end_of_segment_id
    if not ids or ids[-1] != end or end in ids[:-1]:
        return False
    return all(bool(grammar.allowed(ids[:i])[token]) for i, token in enumerate(ids))
