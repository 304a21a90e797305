"""The log counts skipped samples by reason, summed over data-parallel ranks.

A dp = 2 training run on shards with an undecodable image and a truncated shard
(``tests/data/test_loader_shards.py``'s dataset) logs, at every step, ``skipped/<reason>``
for every reason and their total ``skipped_samples``. The reference: two loaders built
here, one per dp rank, read as many micro-batches as the run did by then, and their skip
counters added up.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

from modus_mega.config import config_from_dict, config_to_dict
from modus_mega.data.loader import PackedLoader
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.loop import SKIP_REASONS, train
from modus_mega.vocab import build_vocabulary
from tests.data.test_loader_shards import configure, dataset  # noqa: F401 (dataset: the fixture)
from tests.distributed.helpers import run_distributed

STEPS, ACCUM, DP = 4, 2, 2


def _worker(raw: dict) -> None:
    cfg = config_from_dict(raw)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        train(cfg, ctx)
    finally:
        ctx.close()


def _reference(cfg) -> list[Counter[str]]:
    """Per step: the skips and drops of every dp rank's loader once it has yielded that step's micro-batches."""
    per_step = [Counter() for _ in range(STEPS)]
    for dp_rank in range(DP):
        loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, build_vocabulary(cfg.model.vocab), dp_rank, DP)
        batches = iter(loader)
        for step in range(STEPS):
            for _ in range(ACCUM):
                next(batches)
            per_step[step] += loader.skipped + loader.packer.dropped
    return per_step


def test_log_counts_skipped_samples_by_reason_over_dp(tiny_config, dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = copy.deepcopy(tiny_config)
    configure(cfg, dataset, num_workers=0)
    cfg.data.token_budget = 256
    cfg.training.steps, cfg.training.grad_accum_steps = STEPS, ACCUM
    cfg.training.log_every, cfg.training.checkpoint_every = 1, 0
    cfg.training.wandb_mode = "disabled"
    cfg.training.run_dir = str(tmp_path / "run")
    run_distributed(_worker, DP, config_to_dict(cfg))

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    for record, expected in zip(records, _reference(cfg), strict=True):
        logged = {reason: record[f"skipped/{reason}"] for reason in SKIP_REASONS}
        assert logged == {reason: expected[reason] for reason in SKIP_REASONS}, (record["step"], expected)
        assert record["skipped_samples"] == sum(expected.values())
    # the faults of this dataset are there by the last step: one undecodable image, a shard cut short
    assert records[-1]["skipped/undecodable"] >= 1 and records[-1]["skipped/truncated_tar"] >= 1
