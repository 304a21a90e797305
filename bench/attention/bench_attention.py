"""Attention benchmark: the modus_attn CUDA kernels against compiled FlexAttention (same
lo/hi mask, same tile classification) and, where the mask allows, SDPA and flash-attn varlen.

TFLOP/s count only the unmasked work: with P = number of visible (query, key) pairs,
forward = 4 * P * head_dim * Hq FLOPs (two matmuls), backward = 2.5 x forward (five
matmuls), forward + backward = 3.5 x forward. Masks:

    causal_docs  packed causal documents (text-only pretraining); SDPA (one call per
                 document, is_causal) and flash-attn varlen express it exactly
    modus        the MODUS training mask of DESIGN §3-4: per document 1-3 conditions
                 (1D causal runs, clean VAE + ViT full splits) and a target (a noise split
                 or a 1D causal run), packed, the rest padding; only FlexAttention and the
                 CUDA kernels express it

Run on a GPU (defaults: 8k and 32k tokens, 28 query / 4 KV heads, head dim 128, bf16):

    python bench/attention/bench_attention.py
    python bench/attention/bench_attention.py --tokens 32768 --masks modus --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modus_mega.ops.attention import AttentionBackend  # noqa: E402
from modus_mega.ops.mask import Layout, layout_num_tokens, lo_hi_for_layout, padding_lo_hi  # noqa: E402

MASKS = ("causal_docs", "modus")
BACKENDS = ("cuda", "flex", "sdpa", "flash")
PASSES = ("fwd", "bwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}  # relative to the forward's FLOPs
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[8192, 32768], help="micro-batch token budgets"
    )
    parser.add_argument("--q-heads", type=int, default=28, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument(
        "--head-dim", type=int, default=128, help="head dimension (64 or 128 for the kernels)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype")
    parser.add_argument(
        "--masks", nargs="+", choices=MASKS, default=list(MASKS), help="masks to run"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="backends to run"
    )
    parser.add_argument(
        "--passes", nargs="+", choices=PASSES, default=list(PASSES), help="passes to time"
    )
    parser.add_argument(
        "--doc-tokens", type=int, default=2048, help="mean document length of causal_docs"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="time the CUDA kernels' deterministic backward"
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per measurement")
    parser.add_argument(
        "--iters", type=int, default=20, help="timed iterations per measurement (median reported)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks and inputs")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the cross-check of outputs between backends"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results to this JSON file"
    )
    args = parser.parse_args(argv)
    if args.q_heads % args.kv_heads != 0:
        parser.error(
            f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads ({args.kv_heads})"
        )
    if min(args.tokens) < 1 or args.doc_tokens < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--tokens, --doc-tokens and --iters must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- masks


def causal_docs_layout(num_tokens: int, mean_doc_tokens: int, rng: random.Random) -> Layout:
    """Causal documents with lengths uniform in [mean / 4, 7 mean / 4], the last one cut to
    fill ``num_tokens`` exactly."""
    layout: list[list[tuple[str, int]]] = []
    used = 0
    while used < num_tokens:
        length = min(
            rng.randint(max(1, mean_doc_tokens // 4), max(1, 7 * mean_doc_tokens // 4)),
            num_tokens - used,
        )
        layout.append([("causal", length)])
        used += length
    return layout


def modus_document(rng: random.Random) -> list[tuple[str, int]]:
    """One MODUS training document (DESIGN §3): conditions, then the target. Image splits
    count their two vision markers; 256-1024 latent or ViT tokens per image."""
    runs: list[tuple[str, int]] = []
    for _ in range(rng.randint(1, 3)):
        runs.append(("causal", 1))  # <start:{modality}>
        if rng.random() < 0.4:
            runs.append(("causal", rng.randint(16, 300)))  # 1D condition tokens
            continue
        kind = rng.choice(["vae", "vit", "both"])  # how a 2D condition enters
        if kind in ("vae", "both"):
            runs.append(("full", 2 + rng.choice([256, 576, 1024])))  # clean VAE split
        if kind in ("vit", "both"):
            runs.append(("full", 2 + rng.choice([256, 729, 1024])))  # ViT split
    runs.append(("causal", 1))  # <start:{target}>
    if rng.random() < 0.7:
        runs.append(("noise", 2 + rng.choice([256, 576, 1024])))  # 2D target, noisy latents
    else:
        runs.append(("causal", rng.randint(16, 300)))  # 1D target
    return runs


def modus_layout(num_tokens: int, rng: random.Random) -> tuple[Layout, int]:
    """Documents packed first-fit into ``num_tokens``; returns the layout and the padding."""
    layout: list[list[tuple[str, int]]] = []
    used = 0
    misses = 0
    while misses < 20:
        document = modus_document(rng)
        length = layout_num_tokens([document])
        if used + length <= num_tokens:
            layout.append(document)
            used += length
        else:
            misses += 1
    return layout, num_tokens - used


def build_mask(
    name: str, num_tokens: int, args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Tensor, list[int] | None]:
    """lo, hi (int32 [T], on device) and, for causal_docs, the document lengths."""
    rng = random.Random(f"{args.seed}-{name}-{num_tokens}")
    if name == "causal_docs":
        layout = causal_docs_layout(num_tokens, args.doc_tokens, rng)
        lo, hi = lo_hi_for_layout(layout)
        return lo.to(device), hi.to(device), [runs[0][1] for runs in layout]
    layout, padding = modus_layout(num_tokens, rng)
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(num_tokens - padding, padding)
    return torch.cat([lo, pad_lo]).to(device), torch.cat([hi, pad_hi]).to(device), None


def visible_pairs(lo: Tensor, hi: Tensor) -> int:
    """Number of (query, key) pairs the mask allows: sum over keys of |[lo, hi) ∩ [0, T)|."""
    num_tokens = lo.shape[0]
    lo64, hi64 = lo.long().clamp(0, num_tokens), hi.long().clamp(0, num_tokens)
    return int((hi64 - lo64).clamp_min(0).sum())


# ----------------------------------------------------------------------------- backends

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # q [T, Hq, D], k, v [T, Hkv, D] -> out


def _from_backend(
    backend: AttentionBackend, lo: Tensor, hi: Tensor, scale: float
) -> tuple[AttentionFn, float]:
    """Attention function of a project backend, and its per-micro-batch prepare time (ms)."""
    prepared = backend.prepare(lo, hi)  # warm-up (compiles, allocates)
    prepare_ms = _time_ms(lambda: backend.prepare(lo, hi), warmup=2, iters=10)
    return (lambda q, k, v: backend.forward(q, k, v, prepared, scale)), prepare_ms


def _sdpa_per_document(doc_lengths: list[int], scale: float) -> AttentionFn:
    """torch SDPA, one is_causal call per document (exact for packed causal documents)."""
    bounds = [0]
    for length in doc_lengths:
        bounds.append(bounds[-1] + length)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            out = torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1).unsqueeze(0),  # [1, Hq, t, D]
                k[start:end].transpose(0, 1).unsqueeze(0),
                v[start:end].transpose(0, 1).unsqueeze(0),
                is_causal=True,
                scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            outs.append(out.squeeze(0).transpose(0, 1))
        return torch.cat(outs)

    return attend


def _flash_varlen(doc_lengths: list[int], scale: float, device: torch.device) -> AttentionFn | None:
    """flash-attn's varlen kernel with causal=True, or None when flash_attn is missing."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    cu_seqlens = torch.tensor([0, *doc_lengths], device=device).cumsum(0).to(torch.int32)
    max_len = max(doc_lengths)

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=scale, causal=True
        )

    return attend


def make_backends(
    names: list[str],
    mask: str,
    lo: Tensor,
    hi: Tensor,
    doc_lengths: list[int] | None,
    args: argparse.Namespace,
    scale: float,
) -> tuple[dict[str, AttentionFn], dict[str, float], dict[str, str]]:
    """The runnable backends of this mask, their prepare times, and why others are skipped."""
    from modus_mega.ops.attention_flex import FlexAttention
    from modus_mega.ops.cuda_attention import HAVE_CUDA_ATTENTION, CudaAttention

    fns: dict[str, AttentionFn] = {}
    prepare_ms: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name == "cuda":
            if not HAVE_CUDA_ATTENTION:
                skipped[name] = "extension not built"
                continue
            fns[name], prepare_ms[name] = _from_backend(
                CudaAttention(deterministic=args.deterministic), lo, hi, scale
            )
        elif name == "flex":
            fns[name], prepare_ms[name] = _from_backend(FlexAttention(compiled=True), lo, hi, scale)
        elif doc_lengths is None:
            skipped[name] = f"cannot express the {mask} mask"
        elif name == "sdpa":
            fns[name] = _sdpa_per_document(doc_lengths, scale)
        else:
            flash = _flash_varlen(doc_lengths, scale, lo.device)
            if flash is None:
                skipped[name] = "flash_attn not installed"
            else:
                fns[name] = flash
    return fns, prepare_ms, skipped


# ----------------------------------------------------------------------------- timing


def _time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_pass(
    fn: AttentionFn,
    pass_name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    args: argparse.Namespace,
) -> float:
    """Median milliseconds of one pass of ``fn``."""
    if pass_name == "fwd":
        with torch.no_grad():
            return _time_ms(lambda: fn(q, k, v), args.warmup, args.iters)
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    if pass_name == "bwd":
        out = fn(*leaves)
        return _time_ms(
            lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True),
            args.warmup,
            args.iters,
        )
    return _time_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, dout), args.warmup, args.iters)


@dataclass
class Result:
    """One measurement."""

    mask: str
    tokens: int
    backend: str
    pass_name: str
    ms: float
    tflops: float


def run(args: argparse.Namespace) -> list[Result]:
    """Every (mask, tokens, backend, pass) measurement; prints as it goes."""
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    scale = args.head_dim**-0.5
    results: list[Result] = []
    for mask in args.masks:
        for num_tokens in args.tokens:
            lo, hi, doc_lengths = build_mask(mask, num_tokens, args, device)
            pairs = visible_pairs(lo, hi)
            fwd_flops = 4.0 * pairs * args.head_dim * args.q_heads
            gen = torch.Generator(device=device).manual_seed(args.seed)
            q = torch.randn(
                num_tokens, args.q_heads, args.head_dim, generator=gen, device=device, dtype=dtype
            )
            k = torch.randn(
                num_tokens, args.kv_heads, args.head_dim, generator=gen, device=device, dtype=dtype
            )
            v = torch.randn(
                num_tokens, args.kv_heads, args.head_dim, generator=gen, device=device, dtype=dtype
            )
            dout = torch.randn_like(q)
            print(
                f"\n== mask {mask}, {num_tokens} tokens, density {pairs / num_tokens**2:.4f} "
                f"({pairs / (num_tokens * (num_tokens + 1) / 2):.3f} of causal), "
                f"Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim} {args.dtype}"
            )
            fns, prepare_ms, skipped = make_backends(
                args.backends, mask, lo, hi, doc_lengths, args, scale
            )
            for name, reason in skipped.items():
                print(f"   {name:6s} skipped: {reason}")
            for name, ms in prepare_ms.items():
                print(f"   {name:6s} prepare (once per micro-batch): {ms:.3f} ms")
            if not args.no_check and len(fns) > 1:
                with torch.no_grad():
                    outs = {name: fn(q, k, v).float() for name, fn in fns.items()}
                base_name = "cuda" if "cuda" in outs else next(iter(outs))
                for name, out in outs.items():
                    if name != base_name:
                        diff = (out - outs[base_name]).abs().max().item()
                        print(f"   check: max |{name} - {base_name}| = {diff:.3e}")
            for pass_name in args.passes:
                for name, fn in fns.items():
                    ms = time_pass(fn, pass_name, q, k, v, dout, args)
                    tflops = FLOP_FACTOR[pass_name] * fwd_flops / (ms * 1e-3) / 1e12
                    results.append(Result(mask, num_tokens, name, pass_name, ms, tflops))
                    print(f"   {pass_name:7s} {name:6s} {ms:9.3f} ms  {tflops:7.1f} TFLOP/s")
                _print_ratios(
                    [
                        r
                        for r in results
                        if r.mask == mask and r.tokens == num_tokens and r.pass_name == pass_name
                    ]
                )
            del q, k, v, dout
            torch.cuda.empty_cache()
    return results


def _print_ratios(rows: list[Result]) -> None:
    by_backend = {r.backend: r for r in rows}
    if "cuda" not in by_backend:
        return
    cuda = by_backend["cuda"]
    ratios = [
        f"{other.ms / cuda.ms:.2f}x vs {name}"
        for name, other in by_backend.items()
        if name != "cuda"
    ]
    if ratios:
        print(f"   {rows[0].pass_name:7s} cuda speed-up: " + ", ".join(ratios))


def print_targets(results: list[Result]) -> None:
    """The issue's H100 targets, checked against the results at hand."""

    def find(mask: str, backend: str, pass_name: str) -> Result | None:
        rows = [
            r
            for r in results
            if r.mask == mask and r.backend == backend and r.pass_name == pass_name
        ]
        return max(rows, key=lambda r: r.tokens) if rows else None

    print("\n== targets (H100, largest token count run)")
    cuda_fb, flex_fb = find("modus", "cuda", "fwd_bwd"), find("modus", "flex", "fwd_bwd")
    if cuda_fb and flex_fb:
        ratio = flex_fb.ms / cuda_fb.ms
        print(
            f"   modus fwd+bwd vs FlexAttention at {cuda_fb.tokens}: {ratio:.2f}x (target >= 1.5x)"
        )
    for mask in ("causal_docs", "modus"):
        for pass_name, target in (("fwd", 300.0), ("bwd", 200.0)):
            row = find(mask, "cuda", pass_name)
            if row:
                where = f"{mask} {pass_name} at {row.tokens}"
                print(f"   {where}: {row.tflops:.0f} TFLOP/s (target >= {target:.0f})")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, print, optionally write JSON."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    results = run(args)
    print_targets(results)
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
