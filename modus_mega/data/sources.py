"""Where samples come from: webdataset shards, or procedural scenes in memory.

A source is a list of shards, each an ordered run of samples. ``samples(shard, start,
epoch)`` yields ``(position, Sample | None)`` from sample position ``start`` on; every
random choice about a sample (crop, flip, which caption) is seeded by (seed, epoch,
shard, position), so a sample is the same whichever worker or rank reads it, and a
resumed loader re-reads exactly what it needs.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np
import torch

from modus_mega.config import DataConfig
from modus_mega.data.augment import apply_geometry, random_geometry_for
from modus_mega.data.documents import Sample
from modus_mega.data.procedural import procedural_sample
from modus_mega.data.shard_format import RawSample, SkipCounter
from modus_mega.data.shard_reader import iter_shard, prepare_sample, read_index
from modus_mega.modalities.codecs import DecodeLimits
from modus_mega.modalities.faults import SkipReason
from modus_mega.modalities import modality
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.vocab import Vocabulary

PROCEDURAL_SHARD_SIZE = 64  # samples per virtual shard of the procedural source


class SampleSource(Protocol):
    """What the loader needs from a dataset."""

    num_shards: int
    counter: SkipCounter  # skipped samples by reason, cumulative for this process

    def samples(self, shard: int, start: int, epoch: int) -> Iterator[tuple[int, Sample | None]]:
        """``(position, sample)`` from ``start`` on; None for a sample read but unusable."""
        ...


def sample_rng(seed: int, epoch: int, shard: int, position: int) -> np.random.Generator:
    """The generator of every random choice about one sample."""
    return np.random.default_rng([seed, epoch, shard, position])


class ProceduralSource:
    """The procedural scenes, cut into virtual shards so they load like real data."""

    def __init__(self, data: DataConfig) -> None:
        self.data = data
        self.num_shards = -(-data.num_samples // PROCEDURAL_SHARD_SIZE)
        self.counter = SkipCounter()

    def samples(self, shard: int, start: int, epoch: int) -> Iterator[tuple[int, Sample | None]]:
        """Scenes ``shard * PROCEDURAL_SHARD_SIZE + position``."""
        first = shard * PROCEDURAL_SHARD_SIZE
        for position in range(start, min(PROCEDURAL_SHARD_SIZE, self.data.num_samples - first)):
            self.counter.samples_ok += 1
            yield position, procedural_sample(first + position, self.data.image_size, self.data.seed)


class ShardSource:
    """Webdataset shards (docs/DATA.md): decode, augment, render 2D maps, tokenize 1D ones.

    One bad sample never ends the job: whatever it raises, in the reader or here (augmentation,
    rendering, tokenizers; ``MemoryError`` included), skips it, counted by reason. A source whose
    shards keep yielding nothing is not read forever: after ``2 x num_shards`` shard reads in a
    row without a usable sample it raises, naming the last shard and the skip counts.
    """

    def __init__(self, data: DataConfig, vocab: Vocabulary, size_multiple: int) -> None:
        self.data = data
        self.shards = read_index(data.shards)
        if not self.shards:
            raise ValueError(f"{data.shards}/index.json lists no shards; point data.shards at a dataset directory")
        self.num_shards = len(self.shards)
        self.tokenizers = ModalityTokenizers.load(vocab, data.text_tokenizer, data.vq_dir or None)
        self.size_multiple = size_multiple
        self.limits = DecodeLimits(data.max_image_pixels, data.max_array_bytes)
        self.counter = SkipCounter()
        self.barren_reads = 0  # shard reads in a row that gave no usable sample

    def samples(self, shard: int, start: int, epoch: int) -> Iterator[tuple[int, Sample | None]]:
        """Decoded samples of shard ``shard`` (bad ones are skipped inside, and counted)."""
        info = self.shards[shard]
        usable = False
        for raw in iter_shard(info.path, self.counter, start, info.num_samples, self.limits):
            sample = self._sample_or_skip(raw, shard, epoch)
            self._report_ignored_files()
            usable = usable or sample is not None
            yield raw.index, sample
        self._report_ignored_files()
        self.barren_reads = 0 if usable else self.barren_reads + 1
        if self.barren_reads >= 2 * self.num_shards:
            raise ValueError(
                f"{self.barren_reads} shard reads in a row gave no usable sample (the last: {info.path}; "
                f"{self.counter.summary()}); check the shards under data.shards={self.data.shards}"
            )

    def _sample_or_skip(self, raw: RawSample, shard: int, epoch: int) -> Sample | None:
        """``_sample``, with any exception it raises counted as this sample's skip."""
        try:
            return self._sample(raw, shard, epoch)
        except MemoryError as err:
            reason, detail = SkipReason.OUT_OF_MEMORY, f"MemoryError {err}"
        except Exception as err:  # noqa: BLE001 - one bad sample must never end the job
            reason, detail = SkipReason.UNEXPECTED_ERROR, f"{type(err).__name__}: {err}"
        self.counter.skip(reason, f"{self.shards[shard].path}:{raw.key}: {detail}")
        return None

    def _sample(self, raw: RawSample, shard: int, epoch: int) -> Sample | None:
        """Augment, render and tokenize one decoded sample; None (counted) if nothing is left."""
        info, aug = self.shards[shard], self.data.augment
        rng = sample_rng(self.data.seed, epoch, shard, raw.index)
        geometry = random_geometry_for(raw, rng, aug.crop_min_side, aug.hflip, aug.max_pixels, self.size_multiple)
        if geometry is not None:
            raw = apply_geometry(raw, geometry)
        prepared = prepare_sample(raw)
        tokens = {}
        for name, payload in prepared.payloads.items():
            if modality(name).kind.startswith("feature") and name not in self.tokenizers.quantizers:
                self.counter.ignored_files[f"{name} (no codebook in data.vq_dir)"] += 1
                continue
            tokens[name] = self.tokenizers.encode(name, payload, rng)
        images = {name: torch.from_numpy(image) for name, image in prepared.images.items()}
        if not images and not tokens:
            self.counter.skip(SkipReason.NO_USABLE_MODALITY, f"{info.path}:{raw.key}: nothing left after augmentation")
            return None
        return Sample(key=raw.key, images=images, tokens=tokens)

    def _report_ignored_files(self) -> None:
        """Mirror the ignored-file count into the skip reasons, the counts the training log carries."""
        ignored = sum(self.counter.ignored_files.values())
        if ignored:
            self.counter.skipped[SkipReason.IGNORED_FILES.value] = ignored
