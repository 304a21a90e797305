"""``python -m modus_mega.demo``: the browser demo of any-to-any generation (Gradio).

    python -m modus_mega.demo --ckpt DIR [--ema] [--port 7860] [--host 127.0.0.1] [--size 64]

Loads the checkpoint once (the hf layout ``convert to-hf`` writes, or a training run
directory), renders a few example scenes, and serves the page on loopback unless ``--host``
says otherwise. A checkpoint that cannot be read prints ONE line and exits with status 2.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.demo.app import TITLE, build_app
from modus_mega.demo.examples import write_examples
from modus_mega.demo.session import DemoSession

PROG = "python -m modus_mega.demo"


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(prog=PROG, description=f"{TITLE}: a browser demo (Gradio).")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint in the hf layout (convert to-hf) or a training run directory")
    p.add_argument("--ema", action="store_true", help="a training run's EMA weights instead of its weights")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default; 0.0.0.0 exposes it)")
    p.add_argument("--size", type=int, default=64, help="side of generated images in pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--out", type=Path, help="directory for the requests' outputs (default: a temporary one)")
    add_debug_argument(p)
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, load the checkpoint and serve the page until interrupted; a checkpoint that cannot be read
    is one line and exit status 2 (``modus_mega/cli.py``)."""
    run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="modus_demo_"))
    session = DemoSession(args.ckpt, args.ema, args.size, args.device)
    examples = write_examples(out / "examples", args.size)
    app = build_app(session, examples, out / "requests")
    app.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out)])


if __name__ == "__main__":
    main()
