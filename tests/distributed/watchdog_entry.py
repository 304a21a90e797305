"""Stand-in trainer for the watchdog tests: one all-reduce per step, and one rank fails at step 2.

    python tests/distributed/watchdog_entry.py --out DIR --fault {kill,stop,sleep} --fault-rank R
        --timeout S [--collective-timeout S]

RANK and WORLD_SIZE come from the environment. Rank 0 serves the c10d store in its own
process, as torch's ``env://`` rendezvous does, on a port the kernel picks; it writes the
port to ``DIR/port`` for the other ranks. Every rank then steps inside a ``Watchdog`` of
``--timeout`` seconds, with gloo collectives of ``--collective-timeout`` seconds (default
the same). At step 2 rank ``--fault-rank``:

- kill: SIGKILLs itself (dead);
- stop: SIGSTOPs itself (frozen, its heartbeat thread too);
- sleep: sleeps forever in Python (alive: its heartbeat goes on, its main thread does not).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from modus_mega.parallel.watchdog import Watchdog

RENDEZVOUS_TIMEOUT_S = 120.0
MAX_STEPS = 10_000  # never reached: a rank fails at step 2


def rendezvous(out: Path, rank: int, world_size: int) -> dist.TCPStore:
    """Rank 0 serves the store and publishes its port; the others connect. Sets MASTER_ADDR / MASTER_PORT."""
    timeout = timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    port_file = out / "port"
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        (out / "port.tmp").write_text(str(store.port))
        (out / "port.tmp").replace(port_file)
    else:
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
        while not port_file.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"rank {rank}: rank 0 published no store port within {RENDEZVOUS_TIMEOUT_S} s")
            time.sleep(0.05)
        store = dist.TCPStore("127.0.0.1", int(port_file.read_text()), world_size, is_master=False, timeout=timeout)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    return store


def fail(fault: str) -> None:
    """Die, freeze or hang, as ``fault`` says."""
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        time.sleep(3600)


def main() -> None:
    """Step until the faulty rank fails; the others must then exit non-zero with the watchdog's report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fault", choices=["kill", "stop", "sleep"], required=True)
    parser.add_argument("--fault-rank", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--collective-timeout", type=float)
    args = parser.parse_args()

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = rendezvous(args.out, rank, world_size)
    collective_timeout = timedelta(seconds=args.collective_timeout or args.timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=collective_timeout)
    with Watchdog(rank, world_size, args.timeout) as watchdog:
        for step in range(MAX_STEPS):
            watchdog.progress(step)
            if step == 2 and rank == args.fault_rank:
                fail(args.fault)
            dist.all_reduce(torch.ones(1))
            time.sleep(0.1)


if __name__ == "__main__":
    main()
