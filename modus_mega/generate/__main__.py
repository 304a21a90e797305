"""``python -m modus_mega.generate``: generate targets from conditions with a trained MODUS checkpoint.

    python -m modus_mega.generate --ckpt DIR --cond rgb=img.png --cond caption="a red sphere" \\
        --target depth --target normal [--chain] [--guidance 3] [--steps 30] [--seed 0] [--size 64] --out DIR

Reads a Hugging Face-layout checkpoint (what ``convert to-hf`` writes) or a training run
directory (``--ema``: its EMA weights), checks the request against it before reading any
weight, generates each target with a progress bar, and writes the files of
``inference/outputs.py`` and ``contact_sheet.png`` into ``--out``. A refused request prints
ONE line ``python -m modus_mega.generate: error: ...`` and exits with status 2, as argparse
does for a bad flag. ``--held-out`` generates a training run's held-out scenes
(``training/samples.py``) instead, one row each with its ground truth (``make demo`` ends so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from modus_mega.generate.checkpoint import CheckpointFiles, load, locate
from modus_mega.generate.requests import check_targets, read_conditions
from modus_mega.inference.generator import Generator, Settings
from modus_mega.inference.guidance import GuidanceConfig
from modus_mega.inference.outputs import OutputContext, Request, write_contact_sheet, write_request
from modus_mega.inference.pictures import DEFAULT_FOV_DEGREES
from modus_mega.inference.token_sampling import TokenSampling
from modus_mega.modalities import feature_modalities
from modus_mega.ops.attention import get_attention_backend
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.vq import FeatureQuantizer, load_quantizers
from modus_mega.training.samples import held_out_requests
from modus_mega.vocab import build_vocabulary

PROG = "python -m modus_mega.generate"
CONTACT_SHEET = "contact_sheet.png"


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    p = argparse.ArgumentParser(prog=PROG, description="Generate any MODUS modalities from any others.")
    p.add_argument("--ckpt", type=Path, required=True, help="checkpoint in the hf layout (convert to-hf) or a training run directory")
    p.add_argument("--ema", action="store_true", help="a training run's EMA weights instead of its weights")
    p.add_argument("--cond", action="append", default=[], metavar="NAME=VALUE",
                   help="a condition: a 2D modality's file (rgb=img.png, depth=d.png), caption=\"text\", or a 1D file")
    p.add_argument("--target", action="append", default=[], metavar="NAME", help="a modality to generate (repeat for several)")
    p.add_argument("--held-out", action="store_true",
                   help="instead of --cond / --target: a training run's held-out scenes (training/samples.py), ground truth shown")
    p.add_argument("--chain", action="store_true", help="each finished target becomes a condition of the next")
    p.add_argument("--best-of", type=int, default=1, metavar="N", help="candidates per target, scored by self-verification")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--steps", type=int, default=30, help="flow steps per 2D target")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift of the flow grid (BAGEL samples with 3)")
    p.add_argument("--temperature", type=float, default=0.0, help="1D sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and of token sampling")
    p.add_argument("--size", type=int, default=64, help="side of generated images in pixels (conditions must match)")
    p.add_argument("--expression", help="the referring expression of a grounding target")
    p.add_argument("--feature-grid", type=int, default=4, help="side of the patch grid of local feature targets")
    p.add_argument("--fov", type=float, default=DEFAULT_FOV_DEGREES, help="horizontal field of view of the depth point cloud, degrees")
    p.add_argument("--text-tokenizer", type=Path, help="text tokenizer directory (default: the checkpoint's)")
    p.add_argument("--vq", type=Path, help="feature codebook directory (default: the checkpoint's)")
    p.add_argument("--condition-mode", choices=("vae", "vit", "both"),
                   help="how 2D conditions enter (default: the run's data.condition_mode_2d; hf layout: both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p  # fmt: skip


def _tokenizers(files: CheckpointFiles, args: argparse.Namespace) -> tuple[ModalityTokenizers | None, dict[str, FeatureQuantizer]]:
    """The text tokenizer and feature codebooks of the checkpoint (or of the flags)."""
    vocab = build_vocabulary(files.model.vocab)
    text_dir = args.text_tokenizer or files.text_dir
    vq_dir = args.vq or files.vq_dir
    if vq_dir is not None and not vq_dir.is_dir():
        raise ValueError(f"feature codebook directory {vq_dir} does not exist; pass --vq DIR")
    present = [] if vq_dir is None else [n for n in feature_modalities() if (vq_dir / f"{n}.safetensors").is_file()]
    quantizers = load_quantizers(vq_dir, vocab, present) if vq_dir is not None else {}
    if text_dir is None:
        return None, quantizers
    tokenizers = ModalityTokenizers.load(vocab, text_dir, None)
    tokenizers.quantizers = quantizers
    return tokenizers, quantizers


def run(args: argparse.Namespace) -> Path:
    """Check, load, generate and write the request(s); returns the contact sheet's path."""
    if args.best_of != 1:
        raise ValueError(
            "--best-of > 1 needs self-verification (inference/verification.py), which this build lacks; use --best-of 1"
        )
    files = locate(args.ckpt, args.ema)
    tokenizers, quantizers = _tokenizers(files, args)
    requests, size = _held_out(files, args) if args.held_out else _requested(files, args, tokenizers, quantizers)
    settings = Settings(
        image_size=size, steps=args.steps, shift=args.shift, guidance=GuidanceConfig(scales=(args.guidance,)),
        sampling=TokenSampling(temperature=args.temperature), chain=args.chain, seed=args.seed,
        feature_grid=(args.feature_grid, args.feature_grid),
    )  # fmt: skip
    data = files.data
    if args.condition_mode:
        data.condition_mode_2d = args.condition_mode
    device = torch.device(args.device)
    model, vae = load(files, device)
    head_dim = files.model.llm.head_dim
    attention = get_attention_backend(files.model.attention_backend, device, head_dim=head_dim, dtype=torch.float32)
    generator = Generator(model, vae, attention, data, quantizers, show_progress=not args.quiet)  # type: ignore[arg-type]
    ctx = OutputContext(tokenizers, size, settings.feature_grid, args.fov, model.vocab, quantizers)
    rows = []
    for request in requests:
        generation = generator.generate(request.conditions, request.order, request.targets, settings, request.expressions)
        out = args.out if len(requests) == 1 else args.out / request.conditions.key
        rows.append(write_request(out, request, generation.targets, ctx))
    return write_contact_sheet(args.out / CONTACT_SHEET, rows)


def _requested(
    files: CheckpointFiles, args: argparse.Namespace, tokenizers: ModalityTokenizers | None,
    quantizers: dict[str, FeatureQuantizer],
) -> tuple[list[Request], tuple[int, int]]:  # fmt: skip
    """The one request of ``--cond`` / ``--target``, checked against the checkpoint, and the generation size."""
    size = (args.size, args.size)
    conditions, order = read_conditions(args.cond, size, tokenizers)
    check_targets(args.target, tokenizers is not None, quantizers, files.has_vae, order, args.expression)
    expressions = {n: tokenizers.text.encode(args.expression) for n in args.target if n == "grounding"} if tokenizers else {}
    return [Request(conditions, order, args.target, expressions)], size


def _held_out(files: CheckpointFiles, args: argparse.Namespace) -> tuple[list[Request], tuple[int, int]]:
    """A training run's held-out requests (with their ground truth) and its image size."""
    if files.run is None:
        raise ValueError(
            f"--held-out needs a training run directory (its data config), but {args.ckpt} is an hf-layout checkpoint"
        )
    if args.cond or args.target:
        raise ValueError("--held-out brings its own conditions and targets; drop --cond / --target")
    requests = held_out_requests(files.run)
    if not requests:
        raise ValueError(f"{args.ckpt} trains no 2D target its held-out scenes have; use --cond / --target")
    return requests, (files.run.data.image_size, files.run.data.image_size)


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` and generate; a refused request prints one line and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        sheet = run(args)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.out} (contact sheet: {sheet})")


if __name__ == "__main__":
    main()
