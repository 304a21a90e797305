"""Load what an evaluation needs from disk: a ``Generator`` from a checkpoint, and its tokenizers.

A thin seam until the generation command's loader is shared: the checkpoint is a MODUS model in
the Hugging Face layout (``python -m modus_mega.convert to-hf`` writes one from a training run),
read by ``convert.load_pretrained``. The run's data config (``--config``) says how 2D conditions
enter (``data.condition_mode_2d``) and where its caption tokenizer and codebooks are.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from modus_mega.config import DataConfig, load_config
from modus_mega.convert import load_pretrained
from modus_mega.inference.generator import Generator
from modus_mega.ops.attention import get_attention_backend
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.vocab import Vocabulary


def load_data_config(config: str | None, text_tokenizer: str | None, vq_dir: str | None, condition_mode: str | None) -> DataConfig:
    """The run's data config (``config``'s ``data`` section, else the defaults) with the given fields replaced."""
    data = load_config(config).data if config else DataConfig()
    changes = {"text_tokenizer": text_tokenizer, "vq_dir": vq_dir, "condition_mode_2d": condition_mode}
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    if data.condition_mode_2d not in ("vae", "vit", "both"):
        raise ValueError(f"data.condition_mode_2d must be vae, vit or both, got {data.condition_mode_2d!r}")
    return data


def load_tokenizers(ckpt: str | Path, data: DataConfig, vocab: Vocabulary) -> ModalityTokenizers:
    """The caption tokenizer (``data.text_tokenizer``, else the checkpoint's own) and the codebooks of ``data.vq_dir``."""
    text_dir = Path(data.text_tokenizer or ckpt)
    if not (text_dir / "tokenizer.json").is_file():
        raise ValueError(f"no caption tokenizer at {text_dir}: give --text-tokenizer DIR (or --config with data.text_tokenizer)")
    if data.vq_dir and not Path(data.vq_dir).is_dir():
        raise ValueError(f"--vq-dir {data.vq_dir} is not a directory")
    return ModalityTokenizers.load(vocab, text_dir, data.vq_dir or None)


def load_generator(ckpt: str | Path, data: DataConfig, device: str = "cpu") -> tuple[Generator, ModalityTokenizers]:
    """A ``Generator`` over the checkpoint in ``ckpt`` (Hugging Face layout, with its VAE) and the run's tokenizers."""
    if not Path(ckpt).is_dir():
        raise ValueError(f"checkpoint {ckpt} does not exist (give --ckpt a MODUS checkpoint in the Hugging Face layout)")
    model, vae = load_pretrained(ckpt, device=device)
    if vae is None:
        raise ValueError(f"checkpoint {ckpt} has no VAE (vae.* tensors); export it with its VAE to generate images")
    tokenizers = load_tokenizers(ckpt, data, model.vocab)
    attention = get_attention_backend(model.cfg.attention_backend, torch.device(device), head_dim=model.cfg.llm.head_dim)
    return Generator(model, vae, attention, data, tokenizers.quantizers), tokenizers
