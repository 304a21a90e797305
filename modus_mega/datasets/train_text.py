"""Train a small byte-level BPE caption tokenizer from the text in a shard directory.

    python -m modus_mega.datasets.train_text --shards data/synth --out data/text_tokenizer --vocab-size 512

For CPU runs and tests only: a real run uses the checkpoint's Qwen2 tokenizer. Reads every
caption, referring expression and detection class name of every valid sample (bad samples
are skipped and counted) and writes a tokenizer that ``TextTokenizer.from_pretrained``
loads; ``--vocab-size`` must not exceed the run's ``model.vocab.text_vocab_size``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from modus_mega.cli import add_debug_argument, run_cli
from modus_mega.data.shard_format import SkipCounter
from modus_mega.data.shard_reader import iter_shard, read_index
from modus_mega.modalities.values import Detections, Groundings
from modus_mega.tokenizers.text import train_tiny_text_tokenizer

PROG = "python -m modus_mega.datasets.train_text"


def shard_texts(shards_dir: str | Path, counter: SkipCounter) -> Iterator[str]:
    """Every piece of text in the dataset, in shard order."""
    shards = read_index(shards_dir)
    with tqdm(total=sum(s.num_samples for s in shards), desc="reading text", unit="sample") as bar:
        for shard in shards:
            for sample in iter_shard(shard.path, counter, expected_samples=shard.num_samples):
                bar.update(1)
                for value in sample.modalities.values():
                    if isinstance(value, list):
                        yield from value
                    elif isinstance(value, Groundings):
                        yield from value.expressions
                    elif isinstance(value, Detections):
                        yield from value.classes


def main(argv: list[str] | None = None) -> None:
    """Train and save the tokenizer; print where it went and what was skipped; a user error is one line and exit
    status 2 (``modus_mega/cli.py``)."""
    run_cli(_main, argv, prog=PROG)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description="Train a small BPE caption tokenizer from shards (CPU runs, tests).")
    parser.add_argument("--shards", required=True, help="dataset directory with index.json")
    parser.add_argument("--out", required=True, help="output directory for tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (<= model.vocab.text_vocab_size)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    counter = SkipCounter()
    texts = list(shard_texts(args.shards, counter))
    if not texts:
        raise ValueError(f"no text found in {args.shards} ({counter.summary()}); the tokenizer needs captions")
    path = train_tiny_text_tokenizer(texts, args.vocab_size, args.out)
    print(f"text tokenizer ({args.vocab_size} tokens, {len(texts)} texts) written to {path}; {counter.summary()}")


if __name__ == "__main__":
    main()
