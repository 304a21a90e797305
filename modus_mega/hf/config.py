"""``ModusHFConfig``: the ``config.json`` of a MODUS checkpoint as a ``transformers`` config.

It holds the project's ``ModelConfig`` as a nested dict (``model``), the extended
vocabulary's id ranges (``vocabulary``) and the modality table (``modalities``), so a
checkpoint directory says by itself which token id means what. ``convert/hf.py`` writes
``config.json`` through this class, so ``to-hf`` and ``save_pretrained`` write the same
file; ``model_config()`` reads it back and refuses a vocabulary table that the code would
lay out differently (token ids would silently move).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PretrainedConfig

from modus_mega.config import ModelConfig, config_from_dict, config_to_dict
from modus_mega.modalities import MODALITIES
from modus_mega.vocab import Vocabulary, build_vocabulary

MODEL_TYPE = "modus"
ARCHITECTURE = "ModusHFModel"  # the class name save_pretrained records (modeling.py)
FORMAT_VERSION = 1  # bump when the layout or the naming changes incompatibly


def vocabulary_table(vocab: Vocabulary) -> dict:
    """The extended vocabulary as plain JSON: every id range, by name."""
    return {
        "text": [vocab.text.start, vocab.text.stop],
        "vision_start_id": vocab.vision_start_id,
        "vision_end_id": vocab.vision_end_id,
        "end_of_segment_id": vocab.end_of_segment_id,
        "start_markers": {m.name: vocab.start_marker(m.name) for m in MODALITIES},
        "coordinates": [vocab.coordinates.start, vocab.coordinates.stop],
        "codebooks": {name: [ids.start, ids.stop] for name, ids in vocab.codebooks.items()},
        "num_tokens": vocab.num_tokens,
        "padded_size": vocab.padded_size,
    }


def modality_table() -> list[dict]:
    """The modality table as plain JSON, in id order."""
    return [{"id": i, **dataclasses.asdict(m)} for i, m in enumerate(MODALITIES)]


class ModusHFConfig(PretrainedConfig):
    """The ``transformers`` config of a MODUS checkpoint (``model_type = "modus"``).

    ``model`` is ``config_to_dict(ModelConfig)``; ``has_vae`` says whether the checkpoint
    holds the frozen VAE's tensors (under ``vae.``). The default config is the 7B model's.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        model: dict | None = None,
        vocabulary: dict | None = None,
        modalities: list[dict] | None = None,
        has_vae: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ) -> None:
        self.model = model if model is not None else config_to_dict(ModelConfig())
        if vocabulary is None:
            vocabulary = vocabulary_table(build_vocabulary(config_from_dict({"model": self.model}).model.vocab))
        self.vocabulary = vocabulary
        self.modalities = modalities if modalities is not None else modality_table()
        self.has_vae = has_vae
        self.format_version = format_version
        kwargs.setdefault("tie_word_embeddings", self.model.get("llm", {}).get("tie_word_embeddings", False))
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, has_vae: bool, dtype: torch.dtype | None) -> ModusHFConfig:
        """The config of a checkpoint of ``cfg`` whose decoder is stored in ``dtype``."""
        return cls(
            model=config_to_dict(cfg),
            vocabulary=vocabulary_table(build_vocabulary(cfg.vocab)),
            modalities=modality_table(),
            has_vae=has_vae,
            architectures=[ARCHITECTURE],
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            tie_word_embeddings=cfg.llm.tie_word_embeddings,
        )

    def model_config(self, source: str = "config.json") -> ModelConfig:
        """The project's ``ModelConfig``.

        Refuses a config of another format version, and one whose stored vocabulary table
        differs from what ``modus_mega/vocab.py`` lays out for it (token ids would move).
        """
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{source} has format_version={self.format_version!r}; this code reads MODUS checkpoints of format "
                f"{FORMAT_VERSION}: convert it with the version that wrote it"
            )
        cfg = config_from_dict({"model": self.model}, source=source).model
        table = vocabulary_table(build_vocabulary(cfg.vocab))
        stored = self.vocabulary
        if stored != table:
            differing = sorted(k for k in table if not isinstance(stored, dict) or stored.get(k) != table[k])
            raise ValueError(
                f"{source}: the stored vocabulary table differs from modus_mega/vocab.py's layout for this config in "
                f"{differing}; the checkpoint was written by a version that placed tokens differently: convert it "
                "with that version"
            )
        return cfg
