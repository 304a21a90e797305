"""Generation benchmark: KV-cached decoding against recomputing the sequence, flow steps, cache memory.

Three measurements on one model (the tiny config by default; sizes from flags):

    decode   tokens/s of 1D decoding at each context length: with the cache (one new token
             over the cached context per step, ``forward_over_cache``) and without it (the full
             forward of context + tokens so far, recomputed per token); their ratio grows
             with the context, since a cached step costs O(context) attention and O(1)
             everything else while a recomputed one costs O(context) of everything
    flow     flow steps/s of a 2D target: one noisy split (markers included) over a cached
             context, read-only (``SequenceRunner.noisy_split_velocity``)
    memory   bytes of the cache per token, measured (``KVCache.nbytes``) and from the formula
             2 (keys and values) x layers x kv_heads x head_dim x bytes per element

Not a test: it prints a table. CPU, tiny model, about a minute:

    python bench/inference/bench_generation.py
    python bench/inference/bench_generation.py --contexts 256 1024 4096 --hidden 256 --layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modus_mega.config import TimestepConfig, load_config  # noqa: E402
from modus_mega.data.documents import Document, DocumentBuilder, Sample  # noqa: E402
from modus_mega.encoders.vae import FluxAutoEncoder  # noqa: E402
from modus_mega.inference.kv_cache import KVCache, forward_over_cache  # noqa: E402
from modus_mega.inference.sequence import Sequence, SequenceRunner  # noqa: E402
from modus_mega.model.init import init_weights  # noqa: E402
from modus_mega.model.inputs import TOKEN_TEXT, ModelInputs  # noqa: E402
from modus_mega.model.modus import ModusModel  # noqa: E402
from modus_mega.ops.attention_reference import ReferenceAttention  # noqa: E402
from modus_mega.ops.mask import lo_hi_for_layout  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.json"), help="model config (JSON)")
    parser.add_argument("--hidden", type=int, help="override model.llm.hidden_size")
    parser.add_argument("--layers", type=int, help="override model.llm.num_layers")
    parser.add_argument("--heads", type=int, help="override model.llm.num_heads")
    parser.add_argument("--kv-heads", type=int, help="override model.llm.num_kv_heads")
    parser.add_argument("--head-dim", type=int, help="override model.llm.head_dim")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096], help="context lengths (tokens)")
    parser.add_argument("--decode-tokens", type=int, default=4, help="tokens decoded with the cache per context")
    parser.add_argument("--flow-steps", type=int, default=10, help="flow steps timed")
    parser.add_argument("--flow-context", type=int, default=256, help="context of the flow steps (tokens)")
    parser.add_argument("--latent-grid", type=int, default=4, help="a 2D target of grid x grid latent tokens")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[ModusModel, DocumentBuilder]:
    """The model of ``--config`` with the size overrides (random weights, eval mode), and its document builder."""
    flags = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads", "kv_heads": "num_kv_heads", "head_dim": "head_dim"}
    overrides = [f"model.llm.{key}={getattr(args, flag)}" for flag, key in flags.items() if getattr(args, flag)]
    cfg = load_config(args.config, overrides)
    model = ModusModel(cfg.model)
    init_weights(model, 0, cfg.model.llm.init_std)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).eval()
    return model, DocumentBuilder(cfg.data, TimestepConfig(), cfg.model, model.vocab)


def text_inputs(model: ModusModel, ids: torch.Tensor, first_position: int) -> ModelInputs:
    """Model inputs of text tokens ``ids`` [T] at positions ``first_position ...`` (lo/hi of one causal run)."""
    cfg = model.cfg
    lo, hi = lo_hi_for_layout([[("causal", ids.numel())]])
    return ModelInputs(
        input_ids=ids, token_type=torch.full_like(ids, TOKEN_TEXT),
        position_ids=torch.arange(first_position, first_position + ids.numel()), attn_lo=lo, attn_hi=hi,
        vit_patches=torch.zeros(0, cfg.vit.patch_size**2 * cfg.vit.num_channels), vit_position_ids=torch.zeros(0, dtype=torch.long),
        vit_cu_seqlens=torch.zeros(1, dtype=torch.int32), vae_tokens=torch.zeros(0, cfg.patch_latent_dim),
        vae_timesteps=torch.zeros(0), vae_position_ids=torch.zeros(0, dtype=torch.long),
    )  # fmt: skip


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Seconds per call of ``fn`` (after one untimed warm-up call if ``warmup``)."""
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def bench_decode(model: ModusModel, context: int, num_tokens: int) -> dict[str, float]:
    """Tokens/s of decoding after ``context`` tokens: ``num_tokens`` with the cache, one recomputing the sequence."""
    attention, vocab = ReferenceAttention(), model.vocab
    ids = torch.randint(0, vocab.text.stop, (context + num_tokens,), generator=torch.Generator().manual_seed(context))
    no_rows = torch.zeros(0, dtype=torch.long)
    last = torch.zeros(1, dtype=torch.long)

    def prefill() -> KVCache:
        cache = KVCache()
        forward_over_cache(model, attention, cache, text_inputs(model, ids[:context], 0), [("causal", context)], no_rows, no_rows, True)
        return cache

    cache = prefill()

    def cached() -> None:
        step = cache.copy()  # each timed call decodes the same tokens from the same context
        for k in range(num_tokens):
            inputs = text_inputs(model, ids[context + k : context + k + 1], context + k)
            forward_over_cache(model, attention, step, inputs, [("causal", 1)], last, no_rows, True)

    def recomputed() -> None:  # one token: every recomputed step costs about the same at these contexts
        end = context + 1
        model(text_inputs(model, ids[:end], 0), torch.tensor([end - 1]), no_rows, attention)

    with_cache = num_tokens / timed(cached, 2)
    without = 1.0 / timed(recomputed, 1, warmup=False)  # the model is warm from the cached runs
    return {"context": context, "cached_tok_s": with_cache, "recomputed_tok_s": without, "ratio": with_cache / without,
            "cache_bytes_per_token": cache.nbytes() / cache.num_tokens}  # fmt: skip


@torch.no_grad()
def bench_flow(model: ModusModel, builder: DocumentBuilder, context: int, grid: int, steps: int) -> float:
    """Flow steps/s of a ``grid`` x ``grid`` noisy split over a cached caption context of ``context`` tokens."""
    vae = FluxAutoEncoder(model.cfg.vae)  # unused by a text-only context: the runner only needs it for images
    runner = SequenceRunner(model, vae, ReferenceAttention(), model.cfg, model.vocab)
    ids = torch.randint(0, model.vocab.text.stop, (context - 1,), generator=torch.Generator().manual_seed(1)).tolist()
    doc = Document(key="bench", target="")
    builder.add_condition(doc, Sample(key="bench", tokens={"caption": ids}), "caption")  # <start:caption> + ids
    seq = Sequence(doc)
    runner.flush(seq)
    x_t = torch.randn(grid * grid, model.cfg.patch_latent_dim, dtype=model.embed_tokens.weight.dtype)
    return 1.0 / timed(lambda: runner.noisy_split_velocity(seq, x_t, 0.5, (grid, grid)), steps)


def main(argv: list[str] | None = None) -> None:
    """Run every measurement and print the tables."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, builder = build_model(args)
    llm = model.cfg.llm
    element = model.embed_tokens.weight.element_size()
    formula = 2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * element
    print(f"model: hidden {llm.hidden_size}, {llm.num_layers} layers, {llm.num_heads} heads / {llm.num_kv_heads} kv heads, "
          f"head dim {llm.head_dim}, {args.dtype}; torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'context':>8} {'cached tok/s':>13} {'recomputed tok/s':>17} {'ratio':>7} {'cache B/token':>14} {'formula B/token':>16}")
    rows = []
    for context in args.contexts:
        row = bench_decode(model, context, args.decode_tokens)
        rows.append(row)
        print(f"{context:>8} {row['cached_tok_s']:>13.1f} {row['recomputed_tok_s']:>17.2f} {row['ratio']:>7.1f} "
              f"{row['cache_bytes_per_token']:>14.0f} {formula:>16}")  # fmt: skip
    flow = bench_flow(model, builder, args.flow_context, args.latent_grid, args.flow_steps)
    print(f"flow: {flow:.1f} steps/s ({args.latent_grid}x{args.latent_grid} latent tokens over {args.flow_context} cached tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": rows, "flow_steps_s": flow, "formula_bytes_per_token": formula}, indent=2))


if __name__ == "__main__":
    main()
