"""The exactly resumable data loader: shards -> documents -> packed micro-batches.

Work split. Each epoch the shard list is shuffled by (seed, epoch) and dealt to
``dp_size * num_workers`` slots: slot ``dp_rank * num_workers + w`` reads every
``num_slots``-th shard. Slots of one epoch are disjoint and together cover every shard
once. Within a shard samples are read in order (tar files are sequential); mixing comes
from the per-epoch shard shuffle and from interleaving the workers.

Determinism. A document is a pure function of (seed, epoch, shard, position). Workers are
read round-robin (PyTorch's in-order DataLoader), and packing runs in the training
process, so the micro-batch stream is a pure function of the seed and the layout.

Exact resume. ``state_dict()`` (taken between micro-batches) records, per logical worker,
where its next sample is; which worker is read next; the origins of the documents waiting
in the packer; and the skip counters. ``load_state_dict`` restarts each worker at its
position, rotates the physical workers so the round-robin continues where it stopped, and
rebuilds the waiting documents from their origins. The restored loader yields exactly
the micro-batches the uninterrupted one would have yielded next.

Another layout. A state is only meaningful at its (dp size, num_workers, seed);
``data/reshard.py`` turns the states of all old dp ranks into states of a new layout. Its
one hook here: a worker's position may hold ``carried`` pieces (``[epoch, shard, first
sample]``: the old layout's unread work), which the worker reads before its own shards.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from modus_mega.config import DataConfig, ModelConfig, TimestepConfig
from modus_mega.data.documents import Document, DocumentBuilder, TokenGeometry
from modus_mega.data.packing import PackedBatch, Packer
from modus_mega.seeding import derive_seed
from modus_mega.data.sources import ProceduralSource, SampleSource, ShardSource
from modus_mega.vocab import Vocabulary

logger = logging.getLogger(__name__)


@dataclass
class WorkerPosition:
    """Where one logical worker's next sample is."""

    epoch: int = 0
    shard_slot: int = 0  # index into this worker's shards of the epoch
    sample: int = 0  # next sample position inside that shard
    # [epoch, shard, first sample] pieces read before the position above: work another layout left (data/reshard.py)
    carried: list[list[int]] = field(default_factory=list)

    def after(self, item: "WorkerItem") -> "WorkerPosition":
        """The position once ``item``, this worker's next sample, was read."""
        if item.carried_left is None:
            return WorkerPosition(item.epoch, item.shard_slot, item.position + 1)
        rest = self.carried[len(self.carried) - item.carried_left :]  # the carried pieces after the item's
        return replace(self, carried=[[item.epoch, item.shard, item.position + 1], *rest])


@dataclass
class WorkerItem:
    """One sample's outcome, sent from a worker to the training process."""

    worker: int  # logical worker id
    epoch: int
    shard_slot: int  # -1 for a sample of a carried piece
    shard: int
    position: int
    document: Document | None  # None: the sample was unusable (counted in ``skipped``)
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped (by reason) since the last item
    carried_left: int | None = None  # a carried piece's sample: how many carried pieces follow; None: own shards


def epoch_shards(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The shard order of ``epoch``."""
    generator = torch.Generator().manual_seed(derive_seed("epoch-shards", seed, epoch))
    return torch.randperm(num_shards, generator=generator).tolist()


def document_generator(seed: int, epoch: int, shard: int, position: int) -> torch.Generator:
    """The generator of the document builder's choices for one sample."""
    return torch.Generator().manual_seed(derive_seed("document", seed, epoch, shard, position))


class _WorkerStream(IterableDataset):
    """Runs inside each loader worker (or in-process when num_workers = 0)."""

    def __init__(self, loader: "PackedLoader", positions: list[WorkerPosition], phase: int) -> None:
        self.loader = loader
        self.positions = positions
        self.phase = phase

    def __iter__(self) -> Iterator[WorkerItem]:
        info = get_worker_info()
        num_workers = len(self.positions)
        physical = info.id if info is not None else 0
        logical = (physical + self.phase) % num_workers
        return self.loader.worker_items(logical, self.positions[logical])


class PackedLoader:
    """Infinite, deterministic, exactly resumable stream of packed micro-batches for one rank."""

    def __init__(
        self,
        data: DataConfig,
        timesteps: TimestepConfig,
        model: ModelConfig,
        vocab: Vocabulary,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.data = data
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_logical_workers = max(1, data.num_workers)
        self.num_slots = dp_size * self.num_logical_workers
        geometry = TokenGeometry.of(model)
        self.builder = DocumentBuilder(data, timesteps, model, vocab)
        self.packer = Packer(data.token_budget, geometry.vit_patch, geometry.vit_max_side, geometry.vae_cell, model.max_latent_size)
        self.source = self._make_source(data, vocab, geometry)
        if self.source.num_shards < self.num_slots:
            raise ValueError(
                f"{self.source.num_shards} shards cannot feed {dp_size} data-parallel ranks x "
                f"{self.num_logical_workers} workers = {self.num_slots} readers: every reader needs a shard. "
                "Write more, smaller shards, or lower data.num_workers."
            )
        self.positions = [WorkerPosition() for _ in range(self.num_logical_workers)]
        self.next_worker = 0
        self.skipped: Counter[str] = Counter()

    @staticmethod
    def _make_source(data: DataConfig, vocab: Vocabulary, geometry: TokenGeometry) -> SampleSource:
        if data.source == "procedural":
            return ProceduralSource(data)
        return ShardSource(data, vocab, size_multiple=geometry.vae_cell)

    # ------------------------------------------------------------------ worker side

    def _build(self, sample, epoch: int, shard: int, position: int) -> Document | None:
        if sample is None:
            return None
        doc = self.builder.build(sample, document_generator(self.data.seed, epoch, shard, position))
        if doc is not None:
            doc.origin = (epoch, shard, position)
        return doc

    def worker_items(self, logical: int, start: WorkerPosition) -> Iterator[WorkerItem]:
        """Every sample of one logical worker from ``start`` on: its carried pieces, then epoch after epoch."""
        reported = Counter(self.source.counter.skipped)
        for epoch, shard_slot, shard, sample_start, carried_left in self._pieces(logical, start):
            for position, sample in self.source.samples(shard, sample_start, epoch):
                doc = self._build(sample, epoch, shard, position)
                if sample is not None and doc is None:
                    self.source.counter.skipped["no_usable_target"] += 1
                now = Counter(self.source.counter.skipped)
                delta, reported = dict(now - reported), now
                yield WorkerItem(logical, epoch, shard_slot, shard, position, doc, delta, carried_left)

    def _pieces(self, logical: int, start: WorkerPosition) -> Iterator[tuple[int, int, int, int, int | None]]:
        """``(epoch, shard_slot, shard, first sample, carried_left)`` of each shard run one worker reads, in order."""
        for index, (epoch, shard, sample_start) in enumerate(start.carried):
            yield epoch, -1, shard, sample_start, len(start.carried) - 1 - index
        slot = self.dp_rank * self.num_logical_workers + logical
        epoch, shard_slot, sample_start = start.epoch, start.shard_slot, start.sample
        while True:
            shards = epoch_shards(self.data.seed, epoch, self.source.num_shards)[slot :: self.num_slots]
            while shard_slot < len(shards):
                yield epoch, shard_slot, shards[shard_slot], sample_start, None
                shard_slot, sample_start = shard_slot + 1, 0
            epoch, shard_slot = epoch + 1, 0

    # ------------------------------------------------------------------ training-process side

    def _items(self) -> Iterator[WorkerItem]:
        stream = _WorkerStream(self, [WorkerPosition(**asdict(p)) for p in self.positions], self.next_worker)
        if self.data.num_workers == 0:
            return iter(stream)
        loader = DataLoader(
            stream, batch_size=None, num_workers=self.data.num_workers, collate_fn=lambda x: x,
            persistent_workers=False, prefetch_factor=4, multiprocessing_context="fork",
        )  # fmt: skip
        return iter(loader)

    def __iter__(self) -> Iterator[PackedBatch]:
        for item in self._items():
            self.positions[item.worker] = self.positions[item.worker].after(item)
            self.next_worker = (item.worker + 1) % self.num_logical_workers
            self.skipped.update(item.skipped)
            if item.document is not None:
                yield from self.packer.push(item.document)

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far, every reason, plus documents too long to pack."""
        return sum(self.skipped.values()) + sum(self.packer.dropped.values())

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The loader's exact position (take it between micro-batches)."""
        return {
            "positions": [asdict(p) for p in self.positions],
            "next_worker": self.next_worker,
            "pending": [list(d.origin) for d in self.packer.pending],
            "skipped": dict(self.skipped),
            "dropped": dict(self.packer.dropped),
            "layout": self.layout,
        }

    @property
    def layout(self) -> dict[str, int]:
        """What a state is only meaningful under (``data/reshard.py`` moves one to another dp size or worker count)."""
        return {"dp_size": self.dp_size, "num_workers": self.num_logical_workers, "seed": self.data.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; the layout must match."""
        if state["layout"] != self.layout:
            raise ValueError(
                f"loader state was saved with {state['layout']} but this run has {self.layout}; an exact resume "
                "needs the same data-parallel size, data.num_workers and data.seed (data/reshard.py moves a "
                "state to another dp size or worker count; the seed must stay)"
            )
        self.positions = [WorkerPosition(**p) for p in state["positions"]]
        self.next_worker = state["next_worker"]
        self.skipped = Counter(state["skipped"])
        self.packer.dropped = Counter(state["dropped"])
        self.packer.pending = [self._rebuild(*origin) for origin in state["pending"]]

    def _rebuild(self, epoch: int, shard: int, position: int) -> Document:
        for found, sample in self.source.samples(shard, position, epoch):
            if found == position and (doc := self._build(sample, epoch, shard, position)) is not None:
                return doc
            break
        raise ValueError(f"cannot rebuild pending document (epoch {epoch}, shard {shard}, sample {position}): the data changed")
