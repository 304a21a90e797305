"""Loader throughput and packing efficiency on synthetic 512 px data, against named baselines.

    python bench/data/bench_loader.py [--samples 96] [--batches 12] [--workers 1 2] [--budgets 8192 32768]

Baselines (printed as ratios, higher is better):
- throughput: 4,500 tokens/s, what one H100 consumes training the 7B MoT (Megatron-Bridge's BAGEL
  figure). The loader must feed that from ONE CPU core, so the ratio is tokens/s per loader core.
- packing efficiency: 0.97 (real tokens / token budget).

The data are generated once into --data (default: a temporary directory), with their text
tokenizer and feature codebooks; the model geometry is configs/7b.json's (ViT /14, VAE /16).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from modus_mega.config import load_config
from modus_mega.data.loader import PackedLoader
from modus_mega.datasets.synth import SynthConfig, write_dataset
from modus_mega.modalities import MODALITY_NAMES
from modus_mega.datasets.train_text import main as train_text
from modus_mega.datasets.train_vq import main as train_vq
from modus_mega.vocab import build_vocabulary

REPO = Path(__file__).resolve().parents[2]
H100_TOKENS_PER_S = 4500.0
PACKING_TARGET = 0.97
CODEBOOK = 64  # k-means needs at least this many global vectors (one per sample); size does not change loader cost


def prepare(data: Path, num_samples: int) -> None:
    """Synthetic 512 px shards + text tokenizer + codebooks, unless already there."""
    if not (data / "shards" / "index.json").exists():
        write_dataset(data / "shards", num_samples, SynthConfig(image_size=512), samples_per_shard=8)
    if not (data / "text" / "tokenizer.json").exists():
        train_text(["--shards", str(data / "shards"), "--out", str(data / "text"), "--vocab-size", "1024"])
    if not (data / "vq" / "vq.json").exists():
        train_vq(["--shards", str(data / "shards"), "--out", str(data / "vq"), "--codebook-size", str(CODEBOOK)])


def make_loader(data: Path, budget: int, workers: int) -> PackedLoader:
    cfg = load_config(REPO / "configs" / "7b.json", [
        "data.source=shards", f"data.shards={data / 'shards'}", f"data.text_tokenizer={data / 'text'}",
        f"data.vq_dir={data / 'vq'}", f"data.num_workers={workers}", f"data.token_budget={budget}",
        f"model.vocab.codebook_size={CODEBOOK}",
    ])  # fmt: skip
    cfg.data.target_weights = {name: 1.0 for name in MODALITY_NAMES}
    return PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, build_vocabulary(cfg.model.vocab))


def measure(loader: PackedLoader, batches: int) -> tuple[float, float, float]:
    """(samples/s, real tokens/s, packing efficiency) over ``batches`` after one warm-up batch."""
    stream = iter(loader)
    next(stream)
    start, docs, tokens, budget = time.perf_counter(), 0, 0, 0
    for _ in range(batches):
        batch = next(stream)
        docs += batch.num_documents
        tokens += batch.num_real_tokens
        budget += batch.model.input_ids.numel()
    elapsed = time.perf_counter() - start
    return docs / elapsed, tokens / elapsed, tokens / budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="dataset cache directory (default: temporary)")
    parser.add_argument("--samples", type=int, default=96, help="synthetic samples to generate")
    parser.add_argument("--batches", type=int, default=12, help="micro-batches timed per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8192, 32768], help="token budgets for packing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        prepare(data, args.samples)
        print(f"throughput (budget 8192; baseline: {H100_TOKENS_PER_S:.0f} tokens/s = one H100 at 7B, per loader core)")
        for workers in args.workers:
            samples_s, tokens_s, _ = measure(make_loader(data, 8192, workers), args.batches)
            per_core = tokens_s / workers
            print(f"  workers={workers}: {samples_s:7.1f} samples/s  {tokens_s:9.0f} tokens/s  "
                  f"{per_core:9.0f} tokens/s/core  ratio {per_core / H100_TOKENS_PER_S:5.2f}x")  # fmt: skip
        print(f"packing efficiency (baseline: {PACKING_TARGET:.2f})")
        for budget in args.budgets:
            _, _, efficiency = measure(make_loader(data, budget, 1), args.batches)
            print(f"  budget={budget}: {efficiency:.4f}  ratio {efficiency / PACKING_TARGET:5.3f}x")


if __name__ == "__main__":
    main()
