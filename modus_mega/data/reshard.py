"""Resharding the data position: loader states saved at one (dp size, num_workers) continued at another.

A ``PackedLoader`` state belongs to one dp rank of one layout: reader slot
``dp_rank * num_workers + w`` reads every ``num_slots``-th shard of each epoch's shuffled
order (``data/loader.py``). When a run resumes at another dp degree or worker count
(``training/checkpoint.py``), ``reshard`` turns the states of ALL old dp ranks into one
state per new dp rank such that, within the pass in progress, no sample is lost and none
is read twice:

1. The old layout's unread work, as pieces ``[epoch, shard, first sample]`` (that shard
   from that sample to its end). First the pieces an earlier reshard carried over that
   are not read yet; then, for every epoch from the oldest any old reader is in to the
   newest (``E``), in the epoch's shuffled order, each shard whose old slot is before it
   (the rest of the shard it stands in, or all of a later one). Shards of slots already
   past an epoch are done. No shard length is needed: a piece past its shard's end reads
   nothing.
2. The pieces are dealt round-robin over the new slots (``new_dp x new_num_workers``); each
   new reader reads its pieces (``WorkerPosition.carried``), then starts epoch ``E + 1``,
   dealt the normal way over the new slots.
3. The documents waiting in the old packers (read, not yet packed; kept by origin) are
   dealt round-robin over the new dp ranks' packers, which rebuild them as any resume does.
4. The skip counters are summed onto new dp rank 0 (the log sums them over dp).

Documents are pure functions of (seed, epoch, shard, position), so each sample is the one
the old run would have built; which rank reads it, and so the packing and the batch order,
change. The seed must stay (it fixes the shard orders). The result is an ordinary state of
the new layout: checkpointed and resumed at that layout, it continues exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from modus_mega.data.loader import WorkerPosition, epoch_shards


def reshard(states: list[dict[str, Any]], dp_size: int, num_workers: int, num_shards: int) -> list[dict[str, Any]]:
    """One loader state per new dp rank (``dp_size`` ranks of ``num_workers`` readers each, at least 1).

    ``states`` are the ``PackedLoader.state_dict()`` of every old dp rank, in dp rank order;
    ``num_shards`` the data's shard count (the same data the states were saved on).
    """
    seed = _old_layout(states)["seed"]
    old_positions = [WorkerPosition(**p) for state in states for p in state["positions"]]  # by old slot
    pieces = _unread_pieces(old_positions, seed, num_shards)
    next_epoch = 1 + max(p.epoch for p in old_positions)
    num_slots = dp_size * num_workers
    readers = [asdict(WorkerPosition(next_epoch, carried=pieces[slot::num_slots])) for slot in range(num_slots)]
    pending = [origin for state in states for origin in state["pending"]]
    return [
        {
            "positions": readers[rank * num_workers : (rank + 1) * num_workers],
            "next_worker": 0,
            "pending": pending[rank::dp_size],
            "skipped": _summed(states, "skipped") if rank == 0 else {},
            "dropped": _summed(states, "dropped") if rank == 0 else {},
            "layout": {"dp_size": dp_size, "num_workers": num_workers, "seed": seed},
        }
        for rank in range(dp_size)
    ]


def _unread_pieces(positions: list[WorkerPosition], seed: int, num_shards: int) -> list[list[int]]:
    """What the old slots (``positions[slot]``) have not read of the epochs up to the newest they are in."""
    pieces = [list(piece) for position in positions for piece in position.carried]
    num_slots = len(positions)
    for epoch in range(min(p.epoch for p in positions), max(p.epoch for p in positions) + 1):
        for index, shard in enumerate(epoch_shards(seed, epoch, num_shards)):
            at = positions[index % num_slots]  # the slot that reads it, as its shard slot ``index // num_slots``
            here = (epoch, index // num_slots)
            if here == (at.epoch, at.shard_slot):
                pieces.append([epoch, shard, at.sample])
            elif here > (at.epoch, at.shard_slot):
                pieces.append([epoch, shard, 0])
    return pieces


def _old_layout(states: list[dict[str, Any]]) -> dict[str, int]:
    layouts = [state["layout"] for state in states]
    if not layouts or len(layouts) != layouts[0]["dp_size"] or any(layout != layouts[0] for layout in layouts):
        raise ValueError(
            f"resharding the data position needs the loader states of every dp rank of one layout, got "
            f"{len(layouts)} with layouts {layouts}; the checkpoint is incomplete or mixed: use an earlier tag"
        )
    return layouts[0]


def _summed(states: list[dict[str, Any]], key: str) -> dict[str, int]:
    return dict(sum((Counter(state[key]) for state in states), Counter()))
