"""Load what an evaluation needs from disk: a ``Generator`` from a checkpoint, and its tokenizers.

A thin seam until the generation command's loader is shared: the checkpoint is a MODUS model in
the Hugging Face layout (``python -m modus_mega.convert to-hf`` writes one from a training run),
read by ``convert.load_pretrained``. The run's config (``--config``) says how 2D conditions enter
(``data.condition_mode_2d``) and where its caption tokenizer and codebooks are; a checkpoint of a
run started from the seeded init holds no VAE, which the run's config then rebuilds
(``model.init.seeded_vae``: training never updates it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from modus_mega.config import DataConfig, ModusConfig, load_config
from modus_mega.convert import load_pretrained
from modus_mega.inference.generator import Generator
from modus_mega.model.init import seeded_vae
from modus_mega.ops.attention import get_attention_backend
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.vocab import Vocabulary


def load_run_config(config: str | None) -> ModusConfig | None:
    """The run's config JSON (None without one)."""
    if not config:
        return None
    if not Path(config).is_file():
        raise ValueError(f"--config {config} does not exist (give the run's config JSON, e.g. configs/tiny_shards.json)")
    return load_config(config)


def load_tokenizers(ckpt: str | Path, data: DataConfig, vocab: Vocabulary) -> ModalityTokenizers:
    """The caption tokenizer (``data.text_tokenizer``, else the checkpoint's own) and the codebooks of ``data.vq_dir``."""
    text_dir = Path(data.text_tokenizer or ckpt)
    if not (text_dir / "tokenizer.json").is_file():
        raise ValueError(f"no caption tokenizer at {text_dir}: give --text-tokenizer DIR (or --config with data.text_tokenizer)")
    if data.vq_dir and not Path(data.vq_dir).is_dir():
        raise ValueError(f"--vq-dir {data.vq_dir} is not a directory")
    return ModalityTokenizers.load(vocab, text_dir, data.vq_dir or None)


def load_generator(
    ckpt: str | Path, run: ModusConfig | None, text_tokenizer: str | None = None, vq_dir: str | None = None,
    condition_mode: str | None = None, device: str = "cpu",
) -> tuple[Generator, ModalityTokenizers]:  # fmt: skip
    """A ``Generator`` over the checkpoint in ``ckpt`` (Hugging Face layout) and the run's tokenizers.

    Without a run config the data settings are the defaults, with the given fields replaced.
    """
    if not Path(ckpt).is_dir():
        raise ValueError(f"checkpoint {ckpt} does not exist (give --ckpt a MODUS checkpoint in the Hugging Face layout)")
    model, vae = load_pretrained(ckpt, device=device)
    if vae is None:
        if run is None:
            raise ValueError(f"checkpoint {ckpt} has no VAE (a run from the seeded init): give --config with the run's config")
        vae = seeded_vae(run).to(device)
    data = run.data if run is not None else DataConfig()
    changes = {"text_tokenizer": text_tokenizer, "vq_dir": vq_dir, "condition_mode_2d": condition_mode}
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    tokenizers = load_tokenizers(ckpt, data, model.vocab)
    attention = get_attention_backend(model.cfg.attention_backend, torch.device(device), head_dim=model.cfg.llm.head_dim)
    return Generator(model, vae, attention, data, tokenizers.quantizers), tokenizers
