"""Command-line options shared by the benchmark and the ablations, and what they load.

``add_common_arguments`` declares the checkpoint, data, suite and sampling options;
``open_from_args`` turns them into a suite with its scenes and, with ``--ckpt``, a generator.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from modus_mega.cli import add_debug_argument
from modus_mega.eval.loading import load_generator, load_run_config
from modus_mega.eval.suites import HELD_OUT_SEED, SUITE_NAMES, EvalScene, Suite, open_suite
from modus_mega.inference.generator import Generator, Settings
from modus_mega.tokenizers import ModalityTokenizers


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Checkpoint, data, suite and sampling options, and ``--debug`` (``modus_mega/cli.py``)."""
    add_debug_argument(parser)
    parser.add_argument("--ckpt", help="MODUS checkpoint in the Hugging Face layout (convert to-hf) or a training run directory")
    parser.add_argument("--ema", action="store_true", help="a training run's EMA weights instead of its weights")
    parser.add_argument("--config", help="the run's config JSON: its data section (condition mode, tokenizer, codebooks)")
    parser.add_argument("--text-tokenizer", help="caption tokenizer directory (default: the config's, else --ckpt)")
    parser.add_argument("--vq-dir", help="feature codebook directory (default: the config's; none: no feature modalities)")
    parser.add_argument("--condition-mode", choices=("vae", "vit", "both"), help="override data.condition_mode_2d")
    parser.add_argument("--suite", default="synth", help=f"benchmark: {', '.join(SUITE_NAMES)} (default synth)")
    parser.add_argument("--data-dir", help="local data directory of an external suite")
    parser.add_argument("--num-scenes", type=int, default=16, help="held-out scenes (default 16)")
    parser.add_argument("--image-size", type=int, default=64, help="scene side in pixels (default 64)")
    parser.add_argument("--feature-grid", type=int, default=4, help="local feature grid of the scenes (default 4)")
    parser.add_argument("--scene-seed", type=int, default=HELD_OUT_SEED, help=f"held-out scene seed (default {HELD_OUT_SEED})")
    parser.add_argument("--steps", type=int, default=30, help="flow steps per 2D target (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass
class Opened:
    """A suite, its scenes, and (with ``--ckpt``) the generator and tokenizers."""

    suite: Suite
    scenes: list[EvalScene]
    generator: Generator | None
    tokenizers: ModalityTokenizers | None
    settings: Settings


def open_from_args(args: argparse.Namespace, need_model: bool = True) -> Opened:
    """Open the suite (and the checkpoint when ``need_model``); any refusal raises ValueError."""
    if need_model and not args.ckpt:
        raise ValueError("give --ckpt DIR (a MODUS checkpoint in the Hugging Face layout, or a training run directory)")
    suite = open_suite(args.suite, args.num_scenes, args.data_dir, args.image_size, args.feature_grid, args.scene_seed)
    generator = tokenizers = None
    if need_model:
        run = load_run_config(args.config)
        generator, tokenizers = load_generator(args.ckpt, run, args.text_tokenizer, args.vq_dir, args.condition_mode, args.device, args.ema)
    scenes = suite.scenes(tokenizers)
    return Opened(suite, scenes, generator, tokenizers, Settings(steps=args.steps, seed=args.seed))
