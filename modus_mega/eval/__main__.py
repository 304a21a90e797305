"""``python -m modus_mega.eval``: the any-to-any benchmark of a checkpoint (or of a trivial baseline).

    python -m modus_mega.eval --ckpt runs/demo/hf --config configs/tiny_shards.json --suite synth \\
        --num-scenes 16 --out runs/demo/eval [--directions rgb:depth,caption:rgb] [--steps 30]
    python -m modus_mega.eval --baseline mean --out runs/demo/eval-mean

Writes ``results.json``, ``results.md`` and ``heatmap.png`` into ``--out`` and prints the table.
Every refusal (a missing checkpoint, an unknown suite, direction or baseline, a data directory
that is not there) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modus_mega.eval.baselines import BASELINES
from modus_mega.cli import run_cli
from modus_mega.eval.directions import parse_directions
from modus_mega.eval.options import add_common_arguments, open_from_args
from modus_mega.eval.report import markdown_table, write_report
from modus_mega.eval.runner import run_baseline, run_suite

PROG = "python -m modus_mega.eval"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="Score a MODUS checkpoint on every source -> target direction "
                                     "of a suite (the any-to-any grid) with exact ground truth.")  # fmt: skip
    add_common_arguments(parser)
    parser.add_argument("--directions", help="comma-separated SOURCE:TARGET (or SOURCE:MIDDLE:TARGET) list; default: all")
    parser.add_argument("--baseline", help=f"score a trivial baseline instead of a model: {', '.join(BASELINES)}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, evaluate, write, print; a refusal is one line on stderr and exit status 2 (``modus_mega/cli.py``)."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    directions = parse_directions(args.directions) if args.directions else None
    opened = open_from_args(args, need_model=args.baseline is None)
    if opened.generator is None:  # a baseline reads no condition: 2D scenes only, no tokenizer needed
        results = run_baseline(args.baseline, opened.scenes, opened.suite.info, directions, args.suite, not args.quiet)
    else:
        results = run_suite(opened.generator, opened.tokenizers, opened.scenes, opened.suite.info, directions,
                            opened.settings, args.suite, str(args.ckpt), not args.quiet)  # fmt: skip
    paths = write_report(results, args.out)
    print(markdown_table(results), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
