"""The 1D tokenizers, each into its own range of one extended vocabulary (DESIGN §2).

- ``text``: captions (and class names / referring expressions) -> ``vocab.text``.
- ``boxes``: detection and grounding -> ``vocab.coordinates`` + text.
- ``vq``: the five feature modalities -> ``vocab.codebooks[name]``; ``train_vq`` trains them.

``ModalityTokenizers`` bundles them behind one ``encode`` / ``decode`` per 1D modality, the
seam the document builder and the inference decoder use. Ids are a segment's content only;
the builder adds ``<start:{modality}>`` before and ``end_of_segment`` after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modus_mega.modalities import feature_modalities, modality
from modus_mega.modalities.values import Detections, Groundings, Payload
from modus_mega.tokenizers.boxes import BoxTokenizer
from modus_mega.tokenizers.text import TextTokenizer
from modus_mega.tokenizers.vq import FeatureQuantizer, load_quantizers
from modus_mega.vocab import Vocabulary


@dataclass
class ModalityTokenizers:
    """Every 1D tokenizer of one vocabulary."""

    vocab: Vocabulary
    text: TextTokenizer
    boxes: BoxTokenizer
    quantizers: dict[str, FeatureQuantizer]  # feature modality -> quantizer (may be partial)

    @classmethod
    def load(
        cls, vocab: Vocabulary, text_dir: str | os.PathLike[str], vq_dir: str | os.PathLike[str] | None
    ) -> ModalityTokenizers:
        """Text tokenizer from ``text_dir``; the codebooks found in ``vq_dir`` (None: none)."""
        text = TextTokenizer.from_pretrained(text_dir, vocab)
        present = [] if vq_dir is None else [n for n in feature_modalities() if (Path(vq_dir) / f"{n}.safetensors").is_file()]
        quantizers = load_quantizers(vq_dir, vocab, present) if vq_dir is not None else {}
        return cls(vocab=vocab, text=text, boxes=BoxTokenizer(vocab, text), quantizers=quantizers)

    def encode(self, name: str, payload: Payload, rng: np.random.Generator) -> list[int]:
        """Content ids of 1D modality ``name``; ``rng`` picks one caption / grounding phrase."""
        encoders = {
            "text": self._encode_text,
            "detections": self._encode_detections,
            "groundings": self._encode_groundings,
            "feature_global": self._encode_features,
            "feature_local": self._encode_features,
        }
        return encoders[self._kind(name)](name, payload, rng)

    def decode(
        self, name: str, ids: list[int], width: int = 1, height: int = 1, grid: tuple[int, int] | None = None
    ) -> Payload:
        """Inverse of ``encode``: boxes need the image ``width``/``height``, local features the ``grid``."""
        decoders = {
            "text": lambda: [self.text.decode(self._content(ids)).strip()],
            "detections": lambda: self.boxes.decode_detections(ids, width, height),
            "groundings": lambda: self._decode_groundings(ids, width, height),
            "feature_global": lambda: self.quantizer(name).detokenize(self._content(ids), self.vocab, grid),
            "feature_local": lambda: self.quantizer(name).detokenize(self._content(ids), self.vocab, grid),
        }
        return decoders[self._kind(name)]()

    @staticmethod
    def _kind(name: str) -> str:
        """The tokenizer kind of 1D modality ``name`` (its table row's ``kind``)."""
        row = modality(name)
        if row.family != "1d":
            raise ValueError(f"{name!r} is a 2D modality; only 1D modalities have tokenizers")
        return row.kind

    def _encode_text(self, name: str, payload: Payload, rng: np.random.Generator) -> list[int]:
        assert isinstance(payload, list)
        return self.text.encode(payload[int(rng.integers(len(payload)))])

    def _encode_detections(self, name: str, payload: Payload, rng: np.random.Generator) -> list[int]:
        assert isinstance(payload, Detections)
        return self.boxes.encode_detections(payload)

    def _encode_groundings(self, name: str, payload: Payload, rng: np.random.Generator) -> list[int]:
        assert isinstance(payload, Groundings)
        return self.boxes.encode_groundings(payload, int(rng.integers(len(payload.expressions))))

    def _encode_features(self, name: str, payload: Payload, rng: np.random.Generator) -> list[int]:
        assert isinstance(payload, np.ndarray)
        return self.quantizer(name).tokenize(payload, self.vocab)

    def _decode_groundings(self, ids: list[int], width: int, height: int) -> Groundings:
        expression, box = self.boxes.decode_grounding(ids, width, height)
        boxes = np.zeros((0, 4), np.float32) if box is None else box[None]
        return Groundings(boxes=boxes, expressions=[expression] if box is not None else [], width=width, height=height)

    def quantizer(self, name: str) -> FeatureQuantizer:
        """The quantizer of feature modality ``name``, with an error that names the fix."""
        if name not in self.quantizers:
            raise ValueError(f"no codebook loaded for {name}; train it with `python -m modus_mega.datasets.train_vq`")
        return self.quantizers[name]

    def _content(self, ids: list[int]) -> list[int]:
        end = self.vocab.end_of_segment_id
        return ids[: ids.index(end)] if end in ids else list(ids)
