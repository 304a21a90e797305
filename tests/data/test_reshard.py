"""Resharding the data position (``data/reshard.py``): another dp size or worker count loses no sample and repeats none.

The planner is checked against the loader's own readers (``PackedLoader.worker_items``) on
synthetic shards of different lengths with holes (samples a reader skips inside): over a
chain of random layouts, what the old readers trained + the documents left waiting in the
packers + what the new readers read up to the end of their first own epoch is every
sample of those epochs exactly once. Then with real documents and packers: old loaders'
batches + the resharded loaders' batches hold every document of the epoch once, and a
resharded state checkpointed mid-way resumes exactly.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict
from itertools import islice
from typing import Iterator

import pytest

from modus_mega.data.loader import PackedLoader, WorkerPosition
from modus_mega.data.reshard import reshard
from modus_mega.data.shard_format import SkipCounter
from tests.data.test_loader import assert_same_batches, make_loader, take

Origin = tuple[int, int, int]  # (epoch, shard, position)


class HoledShards:
    """Shards of ``sizes[shard]`` positions, of which ``holes`` are never yielded (bad samples)."""

    def __init__(self, sizes: list[int], holes: set[tuple[int, int]]) -> None:
        self.sizes, self.holes = sizes, holes
        self.num_shards = len(sizes)
        self.counter = SkipCounter()

    def samples(self, shard: int, start: int, epoch: int) -> Iterator[tuple[int, None]]:
        for position in range(start, self.sizes[shard]):
            if (shard, position) not in self.holes:
                yield position, None

    def epoch(self, epoch: int) -> list[Origin]:
        return [(epoch, s, p) for s in range(self.num_shards) for p, _ in self.samples(s, 0, epoch)]


def synthetic_loaders(cfg, source: HoledShards, dp_size: int, num_workers: int) -> list[PackedLoader]:
    cfg.data.num_workers = num_workers
    cfg.data.num_samples = 64 * source.num_shards  # the procedural source it replaces has as many shards
    loaders = [make_loader(cfg, rank, dp_size) for rank in range(dp_size)]
    for loader in loaders:
        loader.source = source
    return loaders


def read(loader: PackedLoader, worker: int, position: WorkerPosition, n: int) -> tuple[list[Origin], WorkerPosition]:
    """The next ``n`` samples of one reader and its position after them."""
    origins = []
    for item in islice(loader.worker_items(worker, position), n):
        origins.append((item.epoch, item.shard, item.position))
        position = position.after(item)
    return origins, position


def train_for_a_while(
    rng: random.Random, loaders: list[PackedLoader], states: list[dict], trained: Counter
) -> list[dict]:
    """Each reader reads a random number of samples; a random part of what was read is trained, the rest waits."""
    saved = []
    for loader, state in zip(loaders, states):
        waiting = [tuple(origin) for origin in state["pending"]]
        positions = [WorkerPosition(**p) for p in state["positions"]]
        for worker, position in enumerate(positions):
            origins, positions[worker] = read(loader, worker, position, rng.randrange(0, 20))
            waiting += origins
        rng.shuffle(waiting)
        keep = rng.randrange(len(waiting) + 1)
        trained.update(waiting[keep:])
        saved.append({**loader.state_dict(), "positions": [asdict(p) for p in positions], "pending": waiting[:keep]})
    return saved


def through_next_epoch(loaders: list[PackedLoader], states: list[dict]) -> list[Origin]:
    """Every sample the new readers read: their carried pieces, then their first own epoch."""
    origins = []
    for loader, state in zip(loaders, states):
        for worker, position in enumerate(state["positions"]):
            first_own_epoch = position["epoch"]
            for item in loader.worker_items(worker, WorkerPosition(**position)):
                if item.epoch > first_own_epoch:
                    break
                origins.append((item.epoch, item.shard, item.position))
    return origins


@pytest.mark.parametrize("case", range(8))
def test_resharded_readers_cover_every_sample_once(tiny_config, case: int) -> None:
    rng = random.Random(case)
    layouts = [(rng.randint(1, 3), rng.randint(1, 3)) for _ in range(4)]  # (dp, num_workers), one reshard between each
    num_shards = max(dp * workers for dp, workers in layouts) + rng.randrange(4)
    sizes = [rng.randint(1, 7) for _ in range(num_shards)]
    source = HoledShards(sizes, {(s, p) for s in range(num_shards) for p in range(1, sizes[s]) if rng.random() < 0.2})
    trained: Counter = Counter()
    dp, workers = layouts[0]
    loaders = synthetic_loaders(tiny_config, source, dp, workers)
    states = [loader.state_dict() for loader in loaders]
    for dp, workers in layouts[1:]:
        saved = train_for_a_while(rng, loaders, states, trained)
        states = reshard(saved, dp, workers, num_shards)
        loaders = synthetic_loaders(tiny_config, source, dp, workers)
        assert [state["layout"] for state in states] == [loader.layout for loader in loaders]
        next_epoch = states[0]["positions"][0]["epoch"]
        assert all(p["epoch"] == next_epoch for state in states for p in state["positions"])
        pending = [tuple(origin) for state in states for origin in state["pending"]]
        seen = trained + Counter(pending) + Counter(through_next_epoch(loaders, states))
        expected = Counter(origin for epoch in range(next_epoch + 1) for origin in source.epoch(epoch))
        assert seen == expected, (layouts, seen - expected, expected - seen)


def test_skip_counters_move_to_rank_zero_and_incomplete_states_are_refused(tiny_config) -> None:
    loaders = [make_loader(tiny_config, rank, 2) for rank in range(2)]
    states = [loader.state_dict() for loader in loaders]
    states[0]["skipped"], states[1]["skipped"] = {"undecodable": 2}, {"undecodable": 1, "truncated_tar": 4}
    states[1]["dropped"] = {"longer_than_token_budget": 3}
    first, second, third = reshard(states, 3, 1, loaders[0].source.num_shards)
    assert first["skipped"] == {"undecodable": 3, "truncated_tar": 4}
    assert first["dropped"] == {"longer_than_token_budget": 3}
    assert second["skipped"] == third["skipped"] == second["dropped"] == {}
    with pytest.raises(ValueError, match="loader states of every dp rank"):
        reshard(states[:1], 1, 1, loaders[0].source.num_shards)


def record_packed_origins(loader: PackedLoader) -> list[Origin]:
    """A list that fills with the origins of the documents ``loader`` packs into batches."""
    packed: list[Origin] = []
    collate = loader.packer.collate

    def spy(docs):
        packed.extend(d.origin for d in docs)
        return collate(docs)

    loader.packer.collate = spy
    return packed


def epoch_zero_documents(cfg) -> Counter:
    """The origins of every document of epoch 0 that fits a micro-batch (read by one reader alone)."""
    loader = make_loader(cfg)
    docs = Counter()
    for item in loader.worker_items(0, WorkerPosition()):
        if item.epoch > 0:
            return docs
        if item.document is not None and len(item.document) <= cfg.data.token_budget:
            docs[item.document.origin] += 1


def past_epoch_zero(loader: PackedLoader) -> bool:
    """Every reader is in its own shards of epoch 1 and no document of epoch 0 waits."""
    readers_done = all(p.epoch >= 1 and not p.carried for p in loader.positions)
    return readers_done and all(d.origin[0] >= 1 for d in loader.packer.pending)


@pytest.mark.parametrize(("old_dp", "new_dp"), [(2, 1), (1, 2)])
def test_resharded_loaders_pack_the_rest_of_the_epoch(tiny_config, old_dp: int, new_dp: int) -> None:
    tiny_config.data.num_samples = 150  # 3 shards: 64, 64, 22 samples
    expected = epoch_zero_documents(tiny_config)
    old = [make_loader(tiny_config, rank, old_dp) for rank in range(old_dp)]
    packed = Counter()
    for loader in old:
        origins = record_packed_origins(loader)
        take(loader, 4)
        packed.update(origins)
    states = [loader.state_dict() for loader in old]
    assert all(state["pending"] for state in states), "the test should reshard documents waiting in the packers"
    for rank, state in enumerate(reshard(states, new_dp, 1, old[0].source.num_shards)):
        loader = make_loader(tiny_config, rank, new_dp)
        loader.load_state_dict(state)
        origins = record_packed_origins(loader)
        for _ in loader:
            if past_epoch_zero(loader):
                break
        packed.update(origin for origin in origins if origin[0] == 0)
    assert packed == expected, (packed - expected, expected - packed)


def test_resharded_state_checkpointed_midway_resumes_exactly(tiny_config) -> None:
    tiny_config.data.num_samples = 150
    old = [make_loader(tiny_config, rank, 2) for rank in range(2)]
    for loader in old:
        take(loader, 3)
    (state,) = reshard([loader.state_dict() for loader in old], 1, 2, old[0].source.num_shards)  # dp 2 -> 1, 2 workers
    tiny_config.data.num_workers = 2
    straight = make_loader(tiny_config)
    straight.load_state_dict(state)
    expected = take(straight, 10)
    first = make_loader(tiny_config)
    first.load_state_dict(state)
    head = take(first, 4)
    midway = first.state_dict()
    assert all(p["carried"] for p in midway["positions"]), "the test should checkpoint while carried pieces remain"
    assert midway["positions"] != state["positions"]
    resumed = make_loader(tiny_config)
    resumed.load_state_dict(midway)
    assert_same_batches(head + take(resumed, 6), expected)
