"""Train MODUS: parse, build, train, close.

    python launch/pretrain.py --config configs/tiny.json [--set training.steps=10 ...]
"""

from __future__ import annotations

import argparse

import torch

from modus_mega.config import load_config
from modus_mega.training.loop import train


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description="Train MODUS from a config file.")
    parser.add_argument("--config", required=True, help="path to a config JSON, e.g. configs/tiny.json")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="A.B=C",
        help="override a config value, e.g. --set training.steps=10 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return parser.parse_args()


def main() -> None:
    """Entry point."""
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, torch.device(args.device))
    last = result.records[-1]
    print(f"done: {len(result.records)} log records, last loss {last['loss']:.4f}")
    print(f"outputs in {result.run_dir}/: config.json, {result.metrics_path.name}, {result.curve_path.name}")


if __name__ == "__main__":
    main()
