"""The loader: deterministic, exactly resumable, and data-parallel shards disjoint and complete."""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import pytest
import torch

from modus_mega.data.loader import PackedLoader, WorkerPosition
from modus_mega.vocab import build_vocabulary


def make_loader(cfg, dp_rank: int = 0, dp_size: int = 1) -> PackedLoader:
    return PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, build_vocabulary(cfg.model.vocab), dp_rank, dp_size)


def take(loader: PackedLoader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _assert_same_record(x, y)


def _assert_same_record(x, y, path: str = "") -> None:
    """Every field equal, records within records (the batch's ``ModelInputs``) field by field."""
    for f in fields(x):
        u, v = getattr(x, f.name), getattr(y, f.name)
        if is_dataclass(u):
            _assert_same_record(u, v, f"{path}{f.name}.")
        else:
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, path + f.name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_stream(tiny_config, num_workers: int) -> None:
    tiny_config.data.num_samples = 200  # 4 virtual shards: several epochs within the run
    tiny_config.data.num_workers = num_workers
    straight = take(make_loader(tiny_config), 14)
    first = make_loader(tiny_config)
    head = take(first, 6)
    state = first.state_dict()
    assert state["pending"], "the test should resume with documents waiting in the packer"
    resumed = make_loader(tiny_config)
    resumed.load_state_dict(state)
    assert_same_batches(head + take(resumed, 8), straight)


def test_resume_refuses_another_layout(tiny_config) -> None:
    loader = make_loader(tiny_config)
    take(loader, 1)
    state = loader.state_dict()
    tiny_config.data.num_workers = 2
    with pytest.raises(ValueError, match="same data-parallel size"):
        make_loader(tiny_config).load_state_dict(state)


def test_data_parallel_ranks_read_disjoint_complete_epochs(tiny_config) -> None:
    tiny_config.data.num_samples = 64 * 5  # 5 shards over 2 ranks x 2 workers
    tiny_config.data.num_workers = 2
    seen: list[tuple[int, int]] = []
    for rank in range(2):
        loader = make_loader(tiny_config, dp_rank=rank, dp_size=2)
        for worker in range(2):
            for item in loader.worker_items(worker, WorkerPosition()):
                if item.epoch > 0:
                    break
                seen.append((item.shard, item.position))
    assert len(seen) == len(set(seen)) == tiny_config.data.num_samples


def test_too_few_shards_for_the_readers_is_a_clear_error(tiny_config) -> None:
    tiny_config.data.num_samples = 64
    tiny_config.data.num_workers = 2
    with pytest.raises(ValueError, match="every reader needs a shard"):
        make_loader(tiny_config)
