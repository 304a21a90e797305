"""Command line of checkpoint conversion: ``python -m modus_mega.convert <command>``.

Commands: ``from-bagel``, ``to-bagel``, ``to-hf``, ``from-hf``, ``universal``.

``to-hf --text-model`` writes the 1D expert alone as a stock ``Qwen3ForCausalLM``
(``convert/text_model.py``).

``to-hf`` and ``to-bagel`` read a MODUS checkpoint in the hf layout or a training run
directory (one holding ``checkpoints/``: its latest DeepSpeed checkpoint at any tp, pp and
ZeRO stage, ``--ema`` for its EMA weights). Every command streams tensor by tensor (memory
stays near the largest tensor), shows a progress bar, refuses missing / extra /
mis-shaped tensors before writing anything, and writes its output into a temporary
directory renamed into place at the end, so a failed or interrupted run never leaves a
half-written checkpoint.

``universal`` writes a training checkpoint tag's universal form (``<tag>/universal``: full
fp32 weights, Adam moments and EMA per parameter, ``convert/universal.py``), from which a
run resumes at another tp, pp or ZeRO stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from modus_mega.config import ModelConfig, load_config
from modus_mega.convert.bagel import import_bagel, write_bagel
from modus_mega.convert.deepspeed_run import DeepSpeedRunSource, is_run_dir
from modus_mega.convert.files import parse_size
from modus_mega.convert.hf import CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, open_hf, read_hf_config, write_hf
from modus_mega.convert.source import TensorSource
from modus_mega.convert.text_model import write_text_model
from modus_mega.convert.universal import write_universal

_DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _common(parser: argparse.ArgumentParser, shards: bool) -> None:
    parser.add_argument("out", type=Path, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep", help="cast floating tensors (default: keep)")
    if shards:
        parser.add_argument(
            "--max-shard-size", default=f"{DEFAULT_MAX_SHARD_BYTES // 10**9}GB", help="largest shard, e.g. 5GB, 500MB"
        )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all five commands."""
    parser = argparse.ArgumentParser(
        prog="python -m modus_mega.convert",
        description="Convert MODUS checkpoints. Layouts: 'bagel' = BAGEL-7B-MoT's release (ema.safetensors, "
        "llm_config.json, vit_config.json, ae.safetensors, tokenizer); 'hf' = the Hugging Face layout with MODUS "
        "names (sharded safetensors, model.safetensors.index.json, config.json), which is also the MODUS model "
        "checkpoint that load_pretrained reads.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("from-bagel", help="BAGEL release -> MODUS checkpoint (hf layout), vocabulary extended")
    p.add_argument("src", type=Path, help="BAGEL release directory")
    _common(p, shards=True)
    p.add_argument(
        "--config", required=True, help="MODUS run config whose model section matches BAGEL, e.g. configs/7b.json"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C", help="config override")
    p.add_argument("--seed", type=int, default=0, help="seed of the new vocabulary rows")

    run_src = "MODUS checkpoint directory (hf layout) or training run directory (its latest checkpoint)"
    p = commands.add_parser("to-bagel", help="MODUS checkpoint or training run -> BAGEL release layout")
    p.add_argument("src", type=Path, help=run_src)
    _common(p, shards=False)
    p.add_argument(
        "--text-vocab-only", action="store_true", help="keep only the pretrained text rows of the embedding and LM head"
    )
    p.add_argument("--ema", action="store_true", help="a training run's EMA weights instead of its weights")

    p = commands.add_parser("to-hf", help="MODUS checkpoint or training run -> hf layout (re-shard, re-cast)")
    p.add_argument("src", type=Path, help=run_src)
    _common(p, shards=True)
    p.add_argument("--ema", action="store_true", help="a training run's EMA weights instead of its weights")
    p.add_argument(
        "--text-model", action="store_true",
        help="write the 1D expert alone as a stock Qwen3ForCausalLM (AutoModelForCausalLM loads it, no MODUS code)",
    )  # fmt: skip
    p.add_argument("--text-vocab-only", action="store_true", help="with --text-model: only the pretrained text rows")

    p = commands.add_parser("from-hf", help="hf layout -> MODUS checkpoint (validated, re-sharded, re-cast)")
    p.add_argument("src", type=Path, help="checkpoint directory in the hf layout")
    _common(p, shards=True)

    p = commands.add_parser(
        "universal",
        help="training checkpoint tag -> its universal form (<tag>/universal), to resume at another tp / pp / ZeRO",
        description="Write <tag>/universal: every parameter's full fp32 weight, Adam moments and EMA under its "
        "global name, read from the tag at any tp, pp and ZeRO 0-3 layout. A run whose latest tag was saved at "
        "another layout (same dp) resumes from it.",
    )
    p.add_argument("src", type=Path, help="a checkpoint tag, RUN_DIR/checkpoints/<tag> (or RUN_DIR: its latest tag)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <tag>/universal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _require_hf(src: Path) -> None:
    if not (src / CONFIG_FILE).is_file():
        hint = " (it looks like a BAGEL release: use from-bagel)" if (src / "ema.safetensors").is_file() else ""
        hint = " (it is a training run: use to-hf)" if is_run_dir(src) else hint
        raise ValueError(f"{src} is not a MODUS checkpoint in the hf layout: it has no {CONFIG_FILE}{hint}")


def _open_source(args: argparse.Namespace) -> tuple[ModelConfig, TensorSource, Path | None]:
    """The model config, tensors and tokenizer directory of ``args.src`` (a training run or the hf layout)."""
    ema = getattr(args, "ema", False)
    if args.command != "from-hf" and is_run_dir(args.src):
        source = DeepSpeedRunSource(args.src, ema=ema)
        if args.command == "to-bagel" and not source.has_vae:
            source.close()
            raise ValueError(
                f"{args.src} started from the seeded init (init.bagel_dir is empty), so it has no VAE checkpoint "
                "to write as ae.safetensors; export it with to-hf, or train from a BAGEL release"
            )
        return source.config.model, source, source.tokenizer_dir
    if ema:
        raise ValueError(f"--ema reads a training run's EMA weights, but {args.src} is not a run directory "
                         "(it has no checkpoints/); drop --ema")  # fmt: skip
    _require_hf(args.src)
    cfg, _ = read_hf_config(args.src)
    return cfg, open_hf(args.src), args.src


def run(args: argparse.Namespace) -> Path:
    """Execute one parsed command; returns the output directory."""
    if args.command == "universal":
        return write_universal(args.src, overwrite=args.overwrite, progress=not args.quiet)
    dtype, progress = _DTYPES[args.dtype], not args.quiet
    if args.command == "from-bagel":
        cfg = load_config(args.config, args.overrides).model
        return import_bagel(
            args.src, cfg, args.out, seed=args.seed, dtype=dtype, max_shard_bytes=parse_size(args.max_shard_size),
            overwrite=args.overwrite, progress=progress,
        )  # fmt: skip
    cfg, source, tokenizer_dir = _open_source(args)
    with source:
        if args.command == "to-bagel":
            return write_bagel(
                source, cfg, args.out, dtype=dtype, text_vocab_only=args.text_vocab_only,
                tokenizer_dir=tokenizer_dir, overwrite=args.overwrite, progress=progress,
            )  # fmt: skip
        if getattr(args, "text_model", False):
            return write_text_model(
                source, cfg, args.out, text_vocab_only=args.text_vocab_only, dtype=dtype,
                max_shard_bytes=parse_size(args.max_shard_size), tokenizer_dir=tokenizer_dir,
                overwrite=args.overwrite, progress=progress,
            )  # fmt: skip
        if getattr(args, "text_vocab_only", False):
            raise ValueError("--text-vocab-only of to-hf applies to --text-model only; add --text-model or drop it")
        return write_hf(
            source, cfg, args.out, dtype=dtype, max_shard_bytes=parse_size(args.max_shard_size),
            tokenizer_dir=tokenizer_dir, overwrite=args.overwrite, progress=progress,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and convert; a refused input exits with status 1 and the reason."""
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
