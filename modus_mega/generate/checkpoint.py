"""What generation reads from a checkpoint: the serial model, the VAE, the data config and the tokenizer files.

Two layouts (the same two that ``python -m modus_mega.convert to-hf`` reads):

- the Hugging Face layout (what ``to-hf`` writes): ``config.json`` and the shards; the text
  tokenizer files next to them and the feature codebooks in ``vq/`` (``to-hf`` copies both
  there from the run; ``--text-tokenizer`` / ``--vq`` point elsewhere). It records no data config, so 2D conditions
  enter as ``DataConfig()``'s ``condition_mode_2d`` unless the caller says otherwise. Its VAE
  is the one stored under ``vae.``; a checkpoint without one serves 1D targets from 1D
  conditions only.
- a training run directory (it holds ``checkpoints/``): its latest checkpoint at any tp, pp
  and ZeRO stage (``convert/deepspeed_run.py``), its EMA weights with ``ema``; its resolved
  ``config.json`` gives the data config, the text tokenizer (``data.text_tokenizer``, which
  encoded its captions, else the BAGEL release it started from) and ``data.vq_dir``. The VAE is the release's, or for a
  run from the seeded init the seeded VAE of its ``training.seed``.

Locating (``locate``) reads only configs, so a request can be checked before gigabytes of
weights are read (``load``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from modus_mega.config import DataConfig, ModelConfig, ModusConfig, load_config
from modus_mega.convert.deepspeed_run import DeepSpeedRunSource, is_run_dir
from modus_mega.convert.hf import CONFIG_FILE, VQ_DIR, load_model, load_pretrained, read_hf_config
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.host_memory import keep_freed_blocks_in_heap
from modus_mega.model.init import seeded_vae
from modus_mega.model.modus import ModusModel
from modus_mega.modalities import feature_modalities
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.vq import FeatureQuantizer, load_quantizers
from modus_mega.vocab import build_vocabulary

RUN_CONFIG = "config.json"  # the resolved config a training run writes into its directory
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either marks a tokenizer directory


@dataclass
class CheckpointFiles:
    """Where a checkpoint's parts are (no weights read yet)."""

    path: Path
    model: ModelConfig
    data: DataConfig
    text_dir: Path | None  # None: no text tokenizer found
    vq_dir: Path | None  # None: no feature codebooks
    run: ModusConfig | None  # the run's config for a training run directory, else None
    ema: bool  # a run's EMA weights instead of its weights
    has_vae: bool  # False: an hf-layout checkpoint exported without its VAE (1D targets from 1D conditions only)


def locate(path: Path, ema: bool = False) -> CheckpointFiles:
    """The parts of the checkpoint at ``path`` (a Hugging Face-layout directory or a training run directory)."""
    if not path.is_dir():
        raise ValueError(f"--ckpt {path}: no such directory")
    if is_run_dir(path):
        if not (path / RUN_CONFIG).is_file():
            raise ValueError(
                f"--ckpt {path} is a run directory without its {RUN_CONFIG}; it was not written by the training loop"
            )
        run = load_config(path / RUN_CONFIG)
        text_dir = run.data.text_tokenizer or run.init.bagel_dir  # the one its captions were encoded with
        text = Path(text_dir) if text_dir else None
        vq = Path(run.data.vq_dir) if run.data.vq_dir else None
        return CheckpointFiles(path, run.model, run.data, _tokenizer_dir(text), vq, run, ema, has_vae=True)
    if ema:
        raise ValueError(
            f"--ema reads a training run's EMA weights, but {path} is not a run directory (no checkpoints/); drop --ema"
        )
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(
            f"--ckpt {path} is neither a training run directory nor a MODUS checkpoint in the hf layout (no {CONFIG_FILE})"
        )
    model, config = read_hf_config(path)
    vq = path / VQ_DIR
    vq_dir = vq if vq.is_dir() else None
    return CheckpointFiles(path, model, DataConfig(), _tokenizer_dir(path), vq_dir, None, False, config.has_vae)


def _tokenizer_dir(directory: Path | None) -> Path | None:
    """``directory`` if it holds text tokenizer files, else None."""
    if directory is not None and any((directory / f).is_file() for f in TEXT_TOKENIZER_FILES):
        return directory
    return None


def load(files: CheckpointFiles, device: torch.device) -> tuple[ModusModel, FluxAutoEncoder | None]:
    """The serial model and the VAE (None: the checkpoint has none) on ``device``, in eval mode."""
    keep_freed_blocks_in_heap()  # generation's many forwards: see modus_mega/host_memory.py
    if files.run is None:
        model, vae = load_pretrained(files.path, device=device)
        return model, vae
    with DeepSpeedRunSource(files.path, ema=files.ema) as source:
        model, vae = load_model(files.model, source, source.has_vae, device)
    return model, vae if vae is not None else seeded_vae(files.run).to(device)


def load_tokenizers(
    files: CheckpointFiles, text_dir: Path | None = None, vq_dir: Path | None = None
) -> tuple[ModalityTokenizers | None, dict[str, FeatureQuantizer]]:
    """The text tokenizer and feature codebooks of the checkpoint, or of the directories given instead.

    Returns (None, codebooks) for a checkpoint without a text tokenizer: feature targets still decode.
    """
    vocab = build_vocabulary(files.model.vocab)
    text_dir = text_dir or files.text_dir
    vq_dir = vq_dir or files.vq_dir
    if vq_dir is not None and not vq_dir.is_dir():
        raise ValueError(f"feature codebook directory {vq_dir} does not exist; pass --vq DIR")
    present = [] if vq_dir is None else [n for n in feature_modalities() if (vq_dir / f"{n}.safetensors").is_file()]
    quantizers = load_quantizers(vq_dir, vocab, present) if vq_dir is not None else {}
    if text_dir is None:
        return None, quantizers
    tokenizers = ModalityTokenizers.load(vocab, text_dir, None)
    tokenizers.quantizers = quantizers
    return tokenizers, quantizers
