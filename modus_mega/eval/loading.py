"""Load what an evaluation needs from disk: a ``Generator`` from a checkpoint, and its tokenizers.

The checkpoint is read by the generation command's loader (``generate/checkpoint.py``): a MODUS
checkpoint in the Hugging Face layout or a training run directory (``ema``: its EMA weights).
A run directory brings its own config; for an hf-layout checkpoint ``--config`` gives the run's
config, which says how 2D conditions enter (``data.condition_mode_2d``), where its caption
tokenizer and codebooks are, and rebuilds the seeded VAE that a checkpoint of a run from the
seeded init does not hold (``model.init.seeded_vae``: training never updates it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from modus_mega.config import ModusConfig, load_config
from modus_mega.generate.checkpoint import load, load_tokenizers, locate
from modus_mega.inference.generator import Generator
from modus_mega.model.init import seeded_vae
from modus_mega.ops.attention import get_attention_backend
from modus_mega.tokenizers import ModalityTokenizers


def load_run_config(config: str | None) -> ModusConfig | None:
    """The run's config JSON (None without one)."""
    if not config:
        return None
    if not Path(config).is_file():
        raise ValueError(f"--config {config} does not exist (give the run's config JSON, e.g. configs/tiny_shards.json)")
    return load_config(config)


def load_generator(
    ckpt: str | Path, run: ModusConfig | None, text_tokenizer: str | None = None, vq_dir: str | None = None,
    condition_mode: str | None = None, device: str = "cpu", ema: bool = False,
) -> tuple[Generator, ModalityTokenizers]:  # fmt: skip
    """A ``Generator`` over the checkpoint in ``ckpt`` and the run's tokenizers.

    ``run`` (an hf-layout checkpoint's run config) supplies the data settings and the seeded VAE;
    without it the data settings are the defaults. Given fields replace the data settings.
    """
    files = locate(Path(ckpt), ema)
    run = files.run or run
    data = run.data if run is not None else files.data
    changes = {"text_tokenizer": text_tokenizer, "vq_dir": vq_dir, "condition_mode_2d": condition_mode}
    data = dataclasses.replace(data, **{k: v for k, v in changes.items() if v is not None})
    model, vae = load(files, torch.device(device))
    if vae is None:
        if run is None:
            raise ValueError(f"checkpoint {ckpt} has no VAE (a run from the seeded init): give --config with the run's config")
        vae = seeded_vae(run).to(device)
    text_dir = Path(data.text_tokenizer) if data.text_tokenizer else None
    tokenizers, quantizers = load_tokenizers(files, text_dir, Path(data.vq_dir) if data.vq_dir else None)
    if tokenizers is None:
        raise ValueError(f"no caption tokenizer for {ckpt}: give --text-tokenizer DIR (or --config with data.text_tokenizer)")
    attention = get_attention_backend(model.cfg.attention_backend, torch.device(device), head_dim=model.cfg.llm.head_dim)
    return Generator(model, vae, attention, data, quantizers), tokenizers
