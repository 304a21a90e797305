"""Stand-in trainer for the fake-SLURM test of launch/slurm/train.sbatch.

Joins the process group torchrun prepared (gloo over loopback), proves it with an
all-reduce, and records what the launcher handed it (ranks, environment). With
``--wait-for-usr1`` it then behaves like the real trainer under preemption: it waits for
SIGUSR1, "checkpoints" (writes a marker) and exits 0.

    python tests/launch/probe_entry.py --out DIR [--wait-for-usr1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

ENV_KEYS = (
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_IB_TIMEOUT",
    "OMP_NUM_THREADS",
    "MASTER_ADDR",
)
SIGNAL_TIMEOUT_S = 120.0


def main() -> None:
    """Record the launch, then optionally wait for SIGUSR1."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wait-for-usr1", action="store_true")
    args = parser.parse_args()

    received: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
        "group_rank": int(os.environ["GROUP_RANK"]),
        "all_reduce": total.item(),
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))

    if args.wait_for_usr1:
        (args.out / f"ready{rank}").touch()
        deadline = time.monotonic() + SIGNAL_TIMEOUT_S
        while not received:
            if time.monotonic() > deadline:
                raise SystemExit(f"rank {rank}: no SIGUSR1 within {SIGNAL_TIMEOUT_S} s")
            time.sleep(0.05)
        (args.out / f"saved{rank}").touch()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
