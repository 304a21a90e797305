"""The extended vocabulary: one table of id ranges shared by tokenizers and the model.

Layout (ids grow downwards; everything after the text vocabulary is new to MODUS)::

    [0, text_vocab_size)                  pretrained text vocabulary (BAGEL / Qwen2), untouched
    vision_start, vision_end               only if not inside the text vocabulary
    end_of_segment                         closes every 1D segment, so generation knows when to stop
    start markers                          one <start:{modality}> per modality, in modality-table order
    coordinate bins                        box coordinates quantised into `coordinate_bins` bins
    codebooks                              `codebook_size` ids per feature modality, feature_modalities() order
    padding                                up to a multiple of `vocab_multiple` (never a target)
"""

from __future__ import annotations

from dataclasses import dataclass

from modus_mega.config import VocabConfig
from modus_mega.modalities import feature_modalities, modality_id, modality_names


@dataclass(frozen=True)
class IdRange:
    """A half-open range of token ids ``[start, stop)``."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __contains__(self, token_id: int) -> bool:
        return self.start <= token_id < self.stop


@dataclass(frozen=True)
class Vocabulary:
    """Where every kind of token lives in the extended vocabulary."""

    text: IdRange
    vision_start_id: int
    vision_end_id: int
    end_of_segment_id: int
    start_markers: IdRange  # modality_id order
    coordinates: IdRange
    codebooks: dict[str, IdRange]  # feature modality -> its codebook ids
    num_tokens: int  # real tokens (text + new)
    padded_size: int  # rows of the embedding and the LM head

    def start_marker(self, modality_name: str) -> int:
        """The id of ``<start:{modality_name}>``."""
        return self.start_markers.start + modality_id(modality_name)

    def coordinate(self, bin_index: int) -> int:
        """The id of coordinate bin ``bin_index`` in ``[0, coordinate_bins)``."""
        if not 0 <= bin_index < len(self.coordinates):
            raise ValueError(f"coordinate bin {bin_index} outside [0, {len(self.coordinates)})")
        return self.coordinates.start + bin_index

    @property
    def new_tokens(self) -> IdRange:
        """Every id MODUS adds after the pretrained text vocabulary (padding excluded)."""
        return IdRange(self.text.stop, self.num_tokens)


def build_vocabulary(cfg: VocabConfig) -> Vocabulary:
    """Lay out the extended vocabulary for ``cfg``; deterministic, so ids never move."""
    cursor = cfg.text_vocab_size

    def take(n: int) -> IdRange:
        nonlocal cursor
        ids = IdRange(cursor, cursor + n)
        cursor += n
        return ids

    for name in ("vision_start_id", "vision_end_id"):
        token_id = getattr(cfg, name)
        if token_id is not None and not 0 <= token_id < cfg.text_vocab_size:
            raise ValueError(
                f"model.vocab.{name}={token_id} is outside the text vocabulary [0, {cfg.text_vocab_size}); "
                "set it to null to append a new token instead"
            )
    vision_start = cfg.vision_start_id if cfg.vision_start_id is not None else take(1).start
    vision_end = cfg.vision_end_id if cfg.vision_end_id is not None else take(1).start
    end_of_segment = take(1).start
    start_markers = take(len(modality_names()))
    coordinates = take(cfg.coordinate_bins)
    codebooks = {name: take(cfg.codebook_size) for name in feature_modalities()}
    num_tokens = cursor
    multiple = cfg.vocab_multiple
    padded = -(-num_tokens // multiple) * multiple
    return Vocabulary(
        text=IdRange(0, cfg.text_vocab_size),
        vision_start_id=vision_start,
        vision_end_id=vision_end,
        end_of_segment_id=end_of_segment,
        start_markers=start_markers,
        coordinates=coordinates,
        codebooks=codebooks,
        num_tokens=num_tokens,
        padded_size=padded,
    )
