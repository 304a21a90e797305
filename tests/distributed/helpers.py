"""Run a function on several CPU processes joined by gloo (STYLE 13, the CPU tier).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, each with
the environment a launcher would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and one intra-op thread; ``fn(*args)`` runs in each. An exception in any
rank fails the calling test with that rank's traceback.

The rendezvous store is served by the calling process (``rendezvous_store``), as
torchrun's agent does: it listens on a port the kernel picked and holds from the start,
and every rank, rank 0 included, connects to it as a client. Picking a free port and
letting rank 0 bind it later raced with other tests doing the same at the same time.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

from modus_mega.config import ModusConfig, config_from_dict
from modus_mega.parallel.context import ParallelContext


@contextlib.contextmanager
def rendezvous_store() -> Iterator[dict[str, str]]:
    """Serve a c10d TCPStore while the block runs; yield the environment its ranks need.

    ``TORCHELASTIC_USE_AGENT_STORE=True`` makes ``env://`` rendezvous connect every rank
    to MASTER_ADDR:MASTER_PORT as a client (torch/distributed/rendezvous.py,
    ``_create_c10d_store``) instead of rank 0 serving it. The deepspeed launcher passes
    the environment on, so its ranks use the store too (with ``--master_port`` = MASTER_PORT).
    As under torchrun, every process-group init in the block shares this one store.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # port 0: the kernel picks one
    yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    # ``store`` stays referenced until here, so it serves until the block ends


def _entry(rank: int, world_size: int, store_env: dict[str, str], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1", **store_env,
    )  # fmt: skip
    torch.set_num_threads(1)
    fn(*args)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; raise if any rank raised."""
    with rendezvous_store() as store_env:
        mp.spawn(_entry, args=(world_size, store_env, fn, args), nprocs=world_size, join=True)


def config_with(raw: dict[str, Any], overrides: dict[str, Any], run_dir: Path) -> ModusConfig:
    """The config ``raw`` with ``{"section.field": value}`` overrides, training in ``run_dir``."""
    cfg = config_from_dict(copy.deepcopy(raw))
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    cfg.training.run_dir = str(run_dir)
    return cfg


def run_in_layout(
    raw: dict[str, Any], overrides: dict[str, Any], run_dir: Path, action: Callable[[ModusConfig, ParallelContext], Any]
) -> Any:
    """``action(cfg, ctx)`` at the layout of ``config_with(raw, overrides, run_dir)``.

    Megatron's groups are destroyed afterwards; the process group stays for the next layout.
    """
    cfg = config_with(raw, overrides, run_dir)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        return action(cfg, ctx)
    finally:
        parallel_state.destroy_model_parallel()
