"""MoT step benchmark: forward + backward of a few decoder layers at full width, bf16 against FP8.

The project's own ``MoTLayer``s (both experts, one shared attention; ``model/mot.py``) at the
width of ``configs/7b.json`` (hidden 3584, 28/4 heads, SwiGLU 18944), on one packed micro-batch
of MODUS-like documents: per document a causal text run (1D expert), a clean image as a full
split and a noisy image as a noise split (2D expert), so both experts and the MODUS mask are
exercised. The layers are timed in bf16, then their linears are converted in place with
``parallel.fp8.apply_float8`` (``training.fp8.recipe``) and timed again: the same weights.

Reported per precision: ms per forward + backward, tokens/s, model TFLOP/s (the planner's and
the MFU meter's formula, ``plan.timing.training_flops``: 3 x the forward's linear and attention
FLOPs, attention counting visible pairs only) and MFU against ``--peak-tflops`` (H100 SXM dense
bf16: 989). Then FP8 / bf16 side by side: the ratio against the named baseline.

    python bench/training/bench_mot_step.py                 # GPU: 4 layers, 32k tokens, 7B width
    python bench/training/bench_mot_step.py --tiny          # CPU: configs/tiny.json's width, 512 tokens
    python bench/training/bench_mot_step.py --json out.json --recipe rowwise
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from modus_mega.config import LLMConfig, ParallelConfig, TrainingConfig, load_config  # noqa: E402
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE  # noqa: E402
from modus_mega.model.layers import SERIAL_LINEARS  # noqa: E402
from modus_mega.model.mot import LayerContext, MoTLayer  # noqa: E402
from modus_mega.ops.attention import get_attention_backend  # noqa: E402
from modus_mega.ops.mask import lo_hi_for_layout  # noqa: E402
from modus_mega.parallel.context import ParallelContext  # noqa: E402
from modus_mega.parallel.fp8 import apply_float8  # noqa: E402
from modus_mega.plan.shapes import model_shape  # noqa: E402
from modus_mega.plan.timing import micro_batch_flops, training_flops  # noqa: E402
from modus_mega.plan.workload import MicroBatch  # noqa: E402

PRECISIONS = ("bf16", "fp8")  # the baseline first
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "7b.json"), help="config whose model.llm sets the width")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens of the packed micro-batch")
    parser.add_argument("--doc-tokens", type=int, default=4096, help="tokens per document (text, clean image, noisy image)")
    parser.add_argument("--recipe", choices=RECIPES, default="tensorwise", help="torchao FP8 recipe (training.fp8.recipe)")
    parser.add_argument("--emulate", action="store_true", help="torchao's emulated FP8 matmuls (no torch._scaled_mm)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device, for MFU")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per precision")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per precision (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="CPU check: configs/tiny.json's width, 512 tokens, 2 layers, 2 steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.config, args.tokens, args.doc_tokens, args.layers = str(REPO / "configs" / "tiny.json"), 512, 128, 2
        args.warmup, args.iters = 1, 2
    return args


def document_layout(num_tokens: int, doc_tokens: int) -> tuple[list[list[tuple[str, int]]], Tensor]:
    """Packed documents of ``doc_tokens`` (1/4 text, then clean and noisy images of 3/8 each) up to
    ``num_tokens``, the rest one causal run: the mask layout and token types [T]."""
    text, image = doc_tokens // 4, (doc_tokens - doc_tokens // 4) // 2
    layout, types = [], []
    for _ in range(num_tokens // doc_tokens):
        layout.append([("causal", text), ("full", image), ("noise", doc_tokens - text - image)])
        types += [TOKEN_TEXT] * text + [TOKEN_VAE] * (doc_tokens - text)
    rest = num_tokens - len(types)
    if rest:
        layout.append([("causal", rest)])
        types += [TOKEN_TEXT] * rest
    return layout, torch.tensor(types)


def step_flops(config_path: str, num_layers: int, num_tokens: int, pairs: int) -> float:
    """Model FLOPs of one forward + backward of ``num_layers`` decoder layers (the planner's formula)."""
    shape = model_shape(load_config(config_path).model)
    fields = {f.name: 0 for f in dataclasses.fields(MicroBatch)}
    mb = MicroBatch(**(fields | {"tokens": num_tokens, "packing_efficiency": 1.0, "attention_pairs": pairs, "vae_pixels": 1}))
    return training_flops(micro_batch_flops(shape, mb, vae_image_flops=0.0, useful=True), num_layers)


@dataclass
class Result:
    """One precision's measurement."""

    precision: str
    ms: float
    tokens_per_s: float
    tflops: float
    mfu: float


def _time_ms(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``step``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build_layers(llm: LLMConfig, args: argparse.Namespace, device: torch.device) -> nn.ModuleList:
    """``args.layers`` MoT layers in bf16, built on ``device`` (PyTorch's default init, seeded: a
    timing needs realistic magnitudes, not the name-seeded init of training)."""
    torch.manual_seed(args.seed)
    with torch.device(device):
        layers = nn.ModuleList(MoTLayer(llm, SERIAL_LINEARS) for _ in range(args.layers))
    return layers.to(torch.bfloat16)


def to_precision(layers: nn.ModuleList, precision: str, args: argparse.Namespace, ctx: ParallelContext) -> None:
    """Convert the layers' linears for ``precision`` in place (FP8: ``apply_float8``; bf16: nothing)."""
    training = TrainingConfig(precision=precision)
    training.fp8.recipe, training.fp8.emulate = args.recipe, args.emulate
    converted = apply_float8(layers, training, ctx)
    assert (precision == "fp8") == bool(converted), "FP8 converts the layers' linears, bf16 none"


def run(args: argparse.Namespace) -> list[Result]:
    """Time forward + backward of the layers in each precision; prints as it goes."""
    ctx = ParallelContext.initialize(ParallelConfig())
    device = ctx.device
    llm = load_config(args.config).model.llm
    layout, token_type = document_layout(args.tokens, args.doc_tokens)
    lo, hi = lo_hi_for_layout(layout)
    pairs = int((hi.long() - lo.long()).sum())
    flops = step_flops(args.config, args.layers, args.tokens, pairs)
    position_ids = torch.arange(args.tokens)
    attention = get_attention_backend("auto", device)
    layer_ctx = LayerContext.build(
        llm, token_type.to(device), position_ids.to(device), lo.to(device), hi.to(device), torch.bfloat16, attention
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    hidden = torch.randn(args.tokens, llm.hidden_size, generator=gen, device=device, dtype=torch.bfloat16)
    print(
        f"== {args.layers} MoT layers, hidden {llm.hidden_size}, {llm.num_heads}/{llm.num_kv_heads} heads, "
        f"SwiGLU {llm.intermediate_size}, {args.tokens} tokens ({int((token_type == TOKEN_VAE).sum())} 2D), "
        f"{type(attention).__name__}, {device}; {flops / 1e9:.4g} GFLOP per step; FP8 recipe {args.recipe}"
        f"{' (emulated)' if args.emulate else ''}"
    )
    layers = build_layers(llm, args, device)  # the same weights in both precisions
    results = []
    for precision in PRECISIONS:
        to_precision(layers, precision, args, ctx)
        x = hidden.clone().requires_grad_(True)

        def step() -> None:
            layers.zero_grad(set_to_none=True)
            h = x
            for layer in layers:
                h = layer(h, layer_ctx)
            h.float().square().mean().backward()

        ms = _time_ms(step, args.warmup, args.iters, device)
        tflops = flops / (ms * 1e-3) / 1e12
        r = Result(precision, ms, args.tokens / (ms * 1e-3), tflops, tflops / args.peak_tflops)
        results.append(r)
        print(f"   {precision:5s} {ms:10.2f} ms  {r.tokens_per_s:12.0f} tokens/s  {tflops:8.1f} TFLOP/s  MFU {r.mfu:6.1%}")
        del x
    base, fp8 = results
    print(f"   fp8 vs bf16 (baseline): {base.ms / fp8.ms:.2f}x tokens/s")
    ctx.close()
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": args.config, "layers": args.layers, "tokens": args.tokens, "recipe": args.recipe,
            "emulate": args.emulate, "peak_tflops": args.peak_tflops,
            "results": [dataclasses.asdict(r) for r in results],
            "fp8_over_bf16_tokens_per_s": results[0].ms / results[1].ms,
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
