"""The MODUS paper's ablations, each one command over a suite (the synthetic one by default).

    python -m modus_mega.eval.ablations chained --ckpt DIR --num-scenes 16 --out runs/ablations/chained
    python -m modus_mega.eval.ablations steps --ckpt DIR --step-list 1,2,3,5,10,20,50 --out ...

| name | paper | variants | default directions |
|---|---|---|---|
| ``chained`` | Table 2 | ``rgb:normal`` direct vs ``rgb:depth:normal`` chained | (fixed) |
| ``best_of_n`` | Table 3 | best-of-1, best-of-N (``--candidates``) with the likelihood and the grounding verifier | caption -> rgb |
| ``condition_mode`` | Table 4 | ``data.condition_mode_2d`` = vit, vae, both | rgb -> depth, normal, seg, caption |
| ``steps`` | Figure 9 | flow steps 1, 2, 3, 5, 10, 20, 50 (``--step-list``) | rgb:depth, rgb:normal, caption:rgb |

Each writes ``ablation.json`` (every variant's ``results.json`` contents), ``ablation.md`` (variants
as rows, directions' headline metrics as columns) and, for ``steps``, ``steps.png`` (headline
against steps, one line per direction); the table is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modus_mega.cli import run_cli
from modus_mega.eval.directions import Direction, parse_directions
from modus_mega.eval.options import Opened, add_common_arguments, open_from_args
from modus_mega.eval.report import steps_plot, variant_table, write_variants
from modus_mega.eval.runner import SuiteResults, run_suite
from modus_mega.inference.generator import Generator

PROG = "python -m modus_mega.eval.ablations"
PAPER_STEPS: tuple[int, ...] = (1, 2, 3, 5, 10, 20, 50)  # Figure 9's grid


@dataclass(frozen=True)
class Ablation:
    """One ablation: its default directions and how it runs them."""

    directions: str
    run: Callable[[Opened, list[Direction], argparse.Namespace], dict[str, SuiteResults]]
    by_target: bool = False  # table columns are targets (variants run different directions to one target)


def _suite(opened: Opened, directions: list[Direction], args: argparse.Namespace, generator: Generator | None = None,
           candidates: int = 1, verifier: str = "likelihood", **settings: object) -> SuiteResults:  # fmt: skip
    """One run of the suite with ``settings`` replaced (another generator, best-of-N candidates, when given)."""
    assert opened.generator is not None
    return run_suite(
        generator or opened.generator, opened.tokenizers, opened.scenes, opened.suite.info, directions,
        dataclasses.replace(opened.settings, **settings), args.suite, str(args.ckpt), not args.quiet,
        candidates, verifier,
    )  # fmt: skip


def _chained(opened: Opened, directions: list[Direction], args: argparse.Namespace) -> dict[str, SuiteResults]:
    direct = [d for d in directions if len(d.steps) == 2]
    chained = [d for d in directions if len(d.steps) > 2]
    if not direct or not chained:
        raise ValueError("chained compares direct SOURCE:TARGET with chained SOURCE:MIDDLE:TARGET directions; give both")
    return {"direct": _suite(opened, direct, args), "chained": _suite(opened, chained, args)}


def _best_of_n(opened: Opened, directions: list[Direction], args: argparse.Namespace) -> dict[str, SuiteResults]:
    if args.candidates < 2:
        raise ValueError(f"--candidates {args.candidates}: best-of-N compares N >= 2 candidates with best-of-1")
    n = args.candidates
    out = {"best_of_1": _suite(opened, directions, args)}
    for verifier in ("likelihood", "grounding"):
        out[f"{verifier}_best_of_{n}"] = _suite(opened, directions, args, candidates=n, verifier=verifier)
    return out


def _condition_mode(opened: Opened, directions: list[Direction], args: argparse.Namespace) -> dict[str, SuiteResults]:
    base = opened.generator
    assert base is not None
    out = {}
    for mode in ("vit", "vae", "both"):
        data = dataclasses.replace(base.data, condition_mode_2d=mode)
        generator = Generator(base.model, base.vae, base.attention, data, base.quantizers)
        out[mode] = _suite(opened, directions, args, generator)
    return out


def _steps(opened: Opened, directions: list[Direction], args: argparse.Namespace) -> dict[str, SuiteResults]:
    return {str(n): _suite(opened, directions, args, steps=n) for n in _step_list(args.step_list)}


def _step_list(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise ValueError(f"--step-list {text!r} must be positive integers, e.g. 1,2,3,5,10,20,50")
    return steps


ABLATIONS: dict[str, Ablation] = {
    "chained": Ablation("rgb:normal,rgb:depth:normal", _chained, by_target=True),
    "best_of_n": Ablation("caption:rgb", _best_of_n),
    "condition_mode": Ablation("rgb:depth,rgb:normal,rgb:seg,rgb:caption", _condition_mode),
    "steps": Ablation("rgb:depth,rgb:normal,caption:rgb", _steps),
}


def build_parser() -> argparse.ArgumentParser:
    """The ablations' argument parser."""
    parser = argparse.ArgumentParser(prog=PROG, description="Run one of the MODUS paper's ablations over a suite.")
    parser.add_argument("name", help=f"the ablation: {', '.join(ABLATIONS)}")
    add_common_arguments(parser)
    parser.add_argument("--directions", help="override the ablation's directions (SOURCE:TARGET list)")
    parser.add_argument("--candidates", type=int, default=4, help="best_of_n ablation: candidates per target (N)")
    parser.add_argument("--step-list", default=",".join(map(str, PAPER_STEPS)), help="steps ablation: flow step counts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run every variant, write and print; a refusal is one line on stderr and exit status 2
    (``modus_mega/cli.py``)."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.name not in ABLATIONS:
        raise ValueError(f"unknown ablation {args.name!r}; choose one of {list(ABLATIONS)}")
    ablation = ABLATIONS[args.name]
    directions = parse_directions(args.directions or ablation.directions)
    if args.name == "steps":
        _step_list(args.step_list)  # refuse before loading anything
    variants = ablation.run(open_from_args(args), directions, args)
    paths = write_variants(args.name, variants, args.out, ablation.by_target)
    if args.name == "steps":
        paths.append(steps_plot(variants, args.out))
    print(variant_table(args.name, variants, ablation.by_target), end="")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
