"""``python -m modus_mega.eval``: the any-to-any benchmark of a checkpoint (or of a trivial baseline).

    python -m modus_mega.eval --ckpt runs/demo/hf --config configs/tiny_shards.json --suite synth \\
        --num-scenes 16 --out runs/demo/eval [--directions rgb:depth,caption:rgb] [--steps 30]
    python -m modus_mega.eval --baseline mean --config configs/tiny_shards.json --out runs/demo/eval-mean

Writes ``results.json``, ``results.md`` and ``heatmap.png`` into ``--out`` and prints the table.
Every refusal (a missing checkpoint, an unknown suite, direction or baseline, a data directory
that is not there) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modus_mega.eval.baselines import BASELINES
from modus_mega.eval.directions import parse_directions
from modus_mega.eval.loading import load_data_config, load_generator
from modus_mega.eval.report import markdown_table, write_report
from modus_mega.eval.runner import run_baseline, run_suite
from modus_mega.eval.suites import HELD_OUT_SEED, SUITE_NAMES, open_suite
from modus_mega.inference.generator import Settings

PROG = "python -m modus_mega.eval"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``python -m modus_mega.eval.ablations``: checkpoint, data, suite, sampling."""
    parser.add_argument("--ckpt", help="MODUS checkpoint in the Hugging Face layout (python -m modus_mega.convert to-hf)")
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
    parser.add_argument("--out", required=True, help="output directory for results.json, results.md, heatmap.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="Score a MODUS checkpoint on every source -> target direction "
                                     "of a suite (the any-to-any grid) with exact ground truth.")  # fmt: skip
    add_common_arguments(parser)
    parser.add_argument("--directions", help="comma-separated SOURCE:TARGET (or SOURCE:MIDDLE:TARGET) list; default: all")
    parser.add_argument("--baseline", help=f"score a trivial baseline instead of a model: {', '.join(BASELINES)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, evaluate, write, print; a refusal is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        directions = parse_directions(args.directions) if args.directions else None
        if args.baseline is None and not args.ckpt:
            raise ValueError("give --ckpt DIR (a checkpoint) or --baseline NAME")
        suite = open_suite(args.suite, args.num_scenes, args.data_dir, args.image_size, args.feature_grid, args.scene_seed)
        data = load_data_config(args.config, args.text_tokenizer, args.vq_dir, args.condition_mode)
        if args.baseline is not None:  # conditions are ignored: 2D scenes only, no tokenizer needed
            scenes = suite.scenes(None)
            results = run_baseline(args.baseline, scenes, suite.info, directions, args.suite, not args.quiet)
        else:
            generator, tokenizers = load_generator(args.ckpt, data, args.device)
            scenes = suite.scenes(tokenizers)
            settings = Settings(steps=args.steps, seed=args.seed)
            results = run_suite(generator, tokenizers, scenes, suite.info, directions, settings, args.suite, str(args.ckpt),
                                not args.quiet)  # fmt: skip
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    paths = write_report(results, args.out)
    print(markdown_table(results), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
