"""Packed micro-batches, epoch after epoch, as a pure function of the seed.

Every random choice about a sample (target, conditions, flow time) comes from a
generator seeded by (seed, epoch, sample index), and the epoch order from (seed, epoch),
so the stream does not depend on how it is consumed.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Callable, Iterator

import torch

from modus_mega.config import DataConfig, ModelConfig, TimestepConfig
from modus_mega.data.documents import Document, DocumentBuilder, Sample, TokenGeometry
from modus_mega.data.packing import PackedBatch, Packer
from modus_mega.data.procedural import procedural_sample
from modus_mega.vocab import Vocabulary


def _seed(*parts: int) -> int:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (1 << 62)
    return seed


class PackedBatchStream:
    """Infinite stream of packed micro-batches over an indexable sample source."""

    def __init__(
        self,
        data: DataConfig,
        timesteps: TimestepConfig,
        model: ModelConfig,
        vocab: Vocabulary,
        sample_fn: Callable[[int], Sample] | None = None,
    ) -> None:
        self.data = data
        self.builder = DocumentBuilder(data, timesteps, model, vocab)
        geometry = TokenGeometry.of(model)
        self.packer = Packer(
            data.token_budget, geometry.vit_patch, geometry.vit_max_side, geometry.vae_cell, model.max_latent_size
        )
        self.sample_fn = sample_fn or (lambda i: procedural_sample(i, data.image_size, data.seed))
        self.skipped: Counter[str] = Counter()  # reason -> samples skipped

    def _documents(self) -> Iterator[Document]:
        for epoch in itertools.count():
            order = torch.randperm(self.data.num_samples, generator=torch.Generator().manual_seed(_seed(self.data.seed, epoch)))
            for index in order.tolist():
                generator = torch.Generator().manual_seed(_seed(self.data.seed, epoch, index))
                doc = self.builder.build(self.sample_fn(index), generator)
                if doc is None:
                    self.skipped["no_usable_target"] += 1
                    continue
                yield doc

    def __iter__(self) -> Iterator[PackedBatch]:
        return self.packer.pack(self._documents())
