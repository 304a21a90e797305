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
import json
from pathlib import Path

import torch

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.generate.checkpoint import load, load_tokenizers, locate
from modus_mega.generate.requests import check_targets, read_conditions
from modus_mega.inference.generator import GeneratedTarget, Generator, Settings
from modus_mega.inference.guidance import GuidanceConfig
from modus_mega.inference.outputs import OutputContext, Request, write_contact_sheet, write_request
from modus_mega.inference.pictures import DEFAULT_FOV_DEGREES
from modus_mega.inference.token_sampling import TokenSampling
from modus_mega.inference.verification import GroundingVerifier, LikelihoodVerifier, Verifier, best_of_n
from modus_mega.modalities import modality
from modus_mega.ops.attention import get_attention_backend
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.vq import FeatureQuantizer
from modus_mega.training.samples import held_out_requests

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
    p.add_argument("--best-of", type=int, default=1, metavar="N", help="candidates per 2D target, scored by self-verification")
    p.add_argument("--verifier", choices=("likelihood", "grounding"), default="likelihood",
                   help="best-of-N score: log-probability of the caption condition given the candidate, or the share "
                        "of the caption's objects and left/right relations the model's own boxes confirm")
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
    add_debug_argument(p)
    return p  # fmt: skip


def run(args: argparse.Namespace) -> Path:
    """Check, load, generate and write the request(s); returns the contact sheet's path."""
    if args.best_of < 1:
        raise ValueError(f"--best-of {args.best_of}: give at least 1 candidate (1 is plain generation)")
    if args.best_of > 1 and args.chain:
        raise ValueError("--best-of picks each target on its own; drop --chain or use --best-of 1")
    files = locate(args.ckpt, args.ema)
    tokenizers, quantizers = load_tokenizers(files, args.text_tokenizer, args.vq)
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
        out = args.out if len(requests) == 1 else args.out / request.conditions.key
        if args.best_of > 1:
            targets = _best_of(generator, request, settings, args, tokenizers, out)
        else:
            targets = generator.generate(request.conditions, request.order, request.targets, settings, request.expressions).targets
        rows.append(write_request(out, request, targets, ctx))
    return write_contact_sheet(args.out / CONTACT_SHEET, rows)


def _best_of(
    generator: Generator, request: Request, settings: Settings, args: argparse.Namespace,
    tokenizers: ModalityTokenizers | None, out: Path,
) -> list[GeneratedTarget]:  # fmt: skip
    """Each target as the best of ``--best-of`` candidates under ``--verifier``; the scores go to ``best_of.json``.

    The verifier's prompt is the request's caption condition, which both verifiers need.
    """
    caption_ids = request.conditions.tokens.get("caption")
    if not caption_ids or tokenizers is None:
        raise ValueError("--best-of needs a caption condition (--cond caption=\"...\") and the checkpoint's text tokenizer")
    verifier: Verifier = (
        LikelihoodVerifier(caption_ids) if args.verifier == "likelihood"
        else GroundingVerifier(tokenizers.text.decode(caption_ids), tokenizers.text)
    )  # fmt: skip
    chosen, report = [], {}
    for name in request.targets:
        if modality(name).family == "1d":
            raise ValueError(f"--best-of scores generated images; {name} is a 1D target: generate it with --best-of 1")
        verified = best_of_n(generator, request.conditions, request.order, name, settings, args.best_of, verifier,
                             request.expressions)  # fmt: skip
        chosen.append(verified.generation.targets[0])
        report[name] = {"verifier": args.verifier, "scores": verified.scores, "best": verified.best}
    out.mkdir(parents=True, exist_ok=True)
    (out / "best_of.json").write_text(json.dumps(report, indent=1) + "\n")
    return chosen


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
    """Parse ``argv`` and generate; a refused request prints one line and exits with status 2 (``modus_mega/cli.py``)."""
    run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    sheet = run(args)
    print(f"wrote {args.out} (contact sheet: {sheet})")


if __name__ == "__main__":
    main()
