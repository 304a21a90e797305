"""Train MODUS: parse, build, train, close.

    python launch/pretrain.py --config configs/tiny.json [--set training.steps=10 ...]
    deepspeed --num_gpus 4 launch/pretrain.py --config configs/tiny.json --set parallel.tp=2
    torchrun --nproc_per_node 4 launch/pretrain.py --config configs/tiny.json --set parallel.zero_stage=2

One process trains alone; under a launcher every process is one rank. The layout (tp,
pp, ZeRO stage) comes from the config; dp is the world size / (tp * pp). CPU runs use
gloo, GPU runs NCCL (chosen once in ``ParallelContext``). A run continues from
``<run_dir>/checkpoints/latest`` when one exists (``--set training.resume=false`` to
start over).
"""

from __future__ import annotations

import argparse

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.config import load_config
from modus_mega.convert.release import check_bagel_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (``--local_rank`` is what the deepspeed launcher appends)."""
    parser = argparse.ArgumentParser(description="Train MODUS from a config file.")
    parser.add_argument("--config", required=True, help="path to a config JSON, e.g. configs/tiny.json")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="A.B=C",
        help="override a config value, e.g. --set training.steps=10 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user error prints as one line and exits 2 (``modus_mega/cli.py``)."""
    run_cli(_run, argv, prog="launch/pretrain.py")


def _run(argv: list[str]) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.init.bagel_dir:  # every mismatch with the release, in one line, before any rank starts
        check_bagel_config(cfg.model, cfg.init.bagel_dir)
    # The training stack (torch, DeepSpeed, Megatron: ~10 s to import) only once the config is
    # valid, so that a wrong value is reported at once, not after every rank imported it all.
    from modus_mega.parallel.context import ParallelContext
    from modus_mega.training.loop import train

    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        result = train(cfg, ctx)
    finally:
        ctx.close()
    if ctx.is_main:
        status = "preempted, checkpointed" if result.preempted else "done"
        last = f"last loss {result.records[-1]['loss']:.4f}" if result.records else "nothing logged"
        if result.validation:
            last += f", last validation loss {result.validation[-1]['val/loss']:.4f} (step {result.validation[-1]['step']})"
        print(f"{status}: {len(result.records)} log records, {last}")
        print(f"outputs in {result.run_dir}/: config.json, {result.metrics_path.name}, {result.curve_path.name}, checkpoints/")


if __name__ == "__main__":
    main()
