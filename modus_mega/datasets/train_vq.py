"""Train the feature-modality codebooks from shards.

    python -m modus_mega.datasets.train_vq --shards data/synth --out data/vq --codebook-size 32

Reads the feature modalities of every valid sample (bad samples are skipped and counted as
the loader does), subsamples at most ``--max-vectors`` vectors per modality (local features
contribute one vector per patch), trains one quantizer per modality by k-means, and writes
``{out}/{modality}.safetensors`` plus ``{out}/vq.json`` with the settings and the held-in
relative reconstruction error of each codebook. ``--codebook-size`` must equal the run's
``model.vocab.codebook_size``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.data.shard_format import SkipCounter
from modus_mega.data.shard_reader import iter_shard, read_index
from modus_mega.modalities import feature_modalities, modality
from modus_mega.tokenizers.vq import relative_error, train_quantizer

PROG = "python -m modus_mega.datasets.train_vq"
logger = logging.getLogger(__name__)


def collect_features(
    shards_dir: str | Path, modalities: Sequence[str], max_samples: int | None = None, progress: bool = True
) -> tuple[dict[str, np.ndarray], SkipCounter]:
    """Feature vectors [N, D] per modality from a shard directory, and the skip counts."""
    counter = SkipCounter()
    shards = read_index(shards_dir)
    total = sum(s.num_samples for s in shards)
    total = min(total, max_samples) if max_samples is not None else total
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in modalities}
    seen = 0
    with tqdm(total=total, desc="reading features", unit="sample", disable=not progress) as bar:
        for shard in shards:
            for sample in iter_shard(shard.path, counter, expected_samples=shard.num_samples):
                for name in modalities:
                    value = sample.modalities.get(name)
                    if isinstance(value, np.ndarray):
                        chunks[name].append(value.reshape(-1, value.shape[-1]))
                seen += 1
                bar.update(1)
                if max_samples is not None and seen >= max_samples:
                    break
            if max_samples is not None and seen >= max_samples:
                break
    features = {}
    for name, parts in chunks.items():
        widths = {p.shape[1] for p in parts}
        if len(widths) > 1:
            raise ValueError(f"{name}: samples disagree on the feature width ({sorted(widths)}); one dataset, one extractor")
        if parts:
            features[name] = np.concatenate(parts)
    return features, counter


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m modus_mega.datasets.train_vq --shards DIR --out DIR --codebook-size K``; a user
    error is one line and exit status 2 (``modus_mega/cli.py``)."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train one k-means vector quantizer per feature modality from MODUS shards.",
    )
    parser.add_argument("--shards", required=True, help="dataset directory holding index.json and the .tar shards")
    parser.add_argument("--out", required=True, help="output directory for {modality}.safetensors and vq.json")
    parser.add_argument("--codebook-size", type=int, required=True, help="entries per codebook (= model.vocab.codebook_size)")
    parser.add_argument("--tokens-per-global", type=int, default=4, help="residual stages, i.e. tokens per global feature (default 4)")
    parser.add_argument("--modalities", default=None, help="comma-separated feature modalities (default: every one)")
    parser.add_argument("--max-samples", type=int, default=None, help="read at most this many samples (default: all)")
    parser.add_argument("--max-vectors", type=int, default=200_000, help="k-means vectors per modality, subsampled (default 200000)")
    parser.add_argument("--iterations", type=int, default=20, help="Lloyd iterations per stage (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of subsampling and k-means++ (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device for k-means, e.g. cuda (default cpu)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    known = feature_modalities()
    names = list(known) if args.modalities is None else [n.strip() for n in args.modalities.split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise ValueError(f"--modalities: {name!r} is not a feature modality; choose from {', '.join(known)}")
    if args.codebook_size < 1 or args.tokens_per_global < 1:
        raise ValueError("--codebook-size and --tokens-per-global must be positive")
    features, counter = collect_features(args.shards, names, args.max_samples)
    logger.info("read %s", counter.summary())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    report: dict[str, dict[str, float | int]] = {}
    for name in names:
        if name not in features:
            logger.warning("no %s features in %s: codebook not trained", name, args.shards)
            continue
        vectors = features[name]
        if len(vectors) > args.max_vectors:
            vectors = vectors[np.sort(rng.choice(len(vectors), args.max_vectors, replace=False))]
        stages = args.tokens_per_global if modality(name).kind == "feature_global" else 1
        try:
            quantizer = train_quantizer(
                name, vectors, args.codebook_size, stages, args.iterations, args.seed, args.device, progress=True
            )
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        quantizer.save(out / f"{name}.safetensors")
        report[name] = {
            "num_vectors": int(len(vectors)),
            "feature_dim": quantizer.feature_dim,
            "num_stages": stages,
            "relative_error": relative_error(quantizer, vectors),
        }
        logger.info("%s: %d vectors, relative error %.4f", name, len(vectors), report[name]["relative_error"])
    manifest = {"codebook_size": args.codebook_size, "shards": str(args.shards), "modalities": report, "skips": counter.as_dict()}
    (out / "vq.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(report)} codebooks to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
