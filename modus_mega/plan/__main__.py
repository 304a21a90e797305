"""Plan a parallel layout for N GPUs and write it as a config the launcher accepts.

    python -m modus_mega.plan --config configs/7b.json --gpus 256 [--out runs/plan/7b-256.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.config import load_config, save_config
from modus_mega.plan.calibration import DEFAULT_CALIBRATION, load_calibration
from modus_mega.plan.report import best_breakdown, ranked_table, rejection_summary, workload_summary
from modus_mega.plan.search import PlanOptions, layout_config, plan


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m modus_mega.plan",
        description="Rank parallel layouts (tp, pp, dp, ZeRO, sequence parallel, recomputation, micro-batch "
        "budget, accumulation) of a config for N GPUs by predicted memory and throughput.",
    )
    parser.add_argument("--config", required=True, help="config JSON to plan for, e.g. configs/7b.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C", help="config override (repeatable)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    parser.add_argument("--out", type=Path, help="write the best layout here as a full config for launch/pretrain.py")
    parser.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION, help="calibration JSON (default: %(default)s)")
    parser.add_argument(
        "--global-batch-tokens", type=int, default=4 * 2**20,
        help="target tokens per optimizer step over all GPUs (default: %(default)s = 4 Mi)",
    )  # fmt: skip
    parser.add_argument("--batch-tolerance", type=float, default=0.25, help="accepted relative miss of the target batch")
    parser.add_argument("--token-budgets", type=_ints, default=(), help="micro-batch budgets to try, e.g. 16384,32768")
    parser.add_argument("--tp", type=_ints, default=(), help="only these tp degrees, e.g. 2,4")
    parser.add_argument("--pp", type=_ints, default=(), help="only these pp degrees")
    parser.add_argument("--zero-stages", type=_ints, default=(0, 1, 2, 3), help="ZeRO stages to try (default: 0,1,2,3)")
    parser.add_argument("--tokens-1d", type=int, default=128, help="assumed mean tokens of a 1D segment (default: %(default)s)")
    parser.add_argument("--packing-efficiency", type=float, help="real tokens / budget (default: estimated)")
    parser.add_argument(
        "--ema", choices=("sharded", "replicated", "none"), default="sharded",
        help="EMA weights: partitioned like the fp32 master weights, a full copy per rank, or none (default: sharded)",
    )  # fmt: skip
    parser.add_argument("--top", type=int, default=15, help="rows of the ranked table (default: %(default)s)")
    parser.add_argument("--show-rejected", action="store_true", help="list every rejected layout with its reasons")
    add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Plan, print the ranked table and the rejections, write the best layout.

    A bad config, calibration or option prints one line and exits 2 (``modus_mega/cli.py``).
    """
    run_cli(lambda args: run(parse_args(args)), argv, prog="python -m modus_mega.plan")


def run(args: argparse.Namespace) -> None:
    """The planner on parsed arguments."""
    cfg = load_config(args.config, args.overrides)
    calibration = load_calibration(args.calibration)
    options = PlanOptions(
        gpus=args.gpus,
        global_batch_tokens=args.global_batch_tokens,
        batch_tolerance=args.batch_tolerance,
        token_budgets=args.token_budgets,
        tp=args.tp,
        pp=args.pp,
        zero_stages=args.zero_stages,
        tokens_1d=args.tokens_1d,
        packing_efficiency=args.packing_efficiency,
        ema=args.ema,
    )
    result = plan(cfg, options, calibration)
    print(f"plan for {args.config} on {args.gpus} GPUs; calibration {args.calibration} ({calibration.device})")
    print(f"target global batch {options.global_batch_tokens / 2**20:.2f} Mi tokens (+-{options.batch_tolerance:.0%}); EMA {options.ema}")
    print(workload_summary(result))
    print()
    print(ranked_table(result, args.top))
    print()
    print(rejection_summary(result, args.show_rejected))
    best = result.best()
    if best is None:
        closest = min(
            (c for c in result.candidates if c.memory is not None),
            key=lambda c: c.memory.peak,  # type: ignore[union-attr]
            default=None,
        )
        if closest is not None:
            print()
            print(f"closest to fitting ({'; '.join(closest.reasons)}):")
            print(best_breakdown(closest))
        raise SystemExit("no layout fits; see the reasons above")
    print()
    print("best layout:")
    print(best_breakdown(best))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_config(layout_config(cfg, best.layout), args.out)
        print(f"wrote {args.out}: launch with  launch/pretrain.py --config {args.out}")


if __name__ == "__main__":
    main()
