"""Training checkpoints: DeepSpeed's model and optimizer state plus what exact resume needs.

Layout under ``<run_dir>/checkpoints/``::

    step_00000040/               one tag per save (DeepSpeed's files: model and optimizer shards)
        trainer_state.json       the step, the skipped-step counters and the resolved config
        extras/rank_00000.pt     per rank: RNG states (torch, CUDA, Python, NumPy), the loader's state,
                                 this rank's EMA pieces (training/ema.py) when training.ema_decay > 0
    latest                       the tag to resume from

With pp > 1 the same calls save and load the pipeline engine, which writes the model per
stage: ``layer_<stage>-model_<tp>-model_states.pt`` (by dp rank 0 of each stage; keys are
the model's global parameter names, ``parallel/pipeline.py``), plus one
``mp_rank_<i>_model_states.pt`` per (stage, tp) rank for the rest of the engine's state.

``latest`` is replaced atomically, and only after every rank finished writing the tag, so
a crash during a save leaves the previous checkpoint as ``latest``. DeepSpeed's own
``latest`` is not written (``save_latest=False``); ours has the same name and format, so
DeepSpeed's tools (``zero_to_fp32.py``) still find it.

Data position: ``PackedLoader.state_dict()`` (per rank: each dp rank reads its own part of
the data); the noise of each micro-batch is seeded by its place in the run. Together with
the restored optimizer state this makes a resumed CPU run reproduce the uninterrupted
losses exactly. Resuming needs the saved layout (the loader checks dp and its workers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from modus_mega.config import ModusConfig, config_to_dict
from modus_mega.data.loader import PackedLoader
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.engine import TrainEngine

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where a run stands: what a resumed run continues from."""

    step: int  # optimizer steps completed
    skipped_steps: int = 0  # of those, skipped for a non-finite loss or gradient (training/failures.py)
    bad_in_a_row: int = 0  # the non-finite streak the last steps ended with


def checkpoint_root(cfg: ModusConfig) -> Path:
    """The directory holding this run's checkpoint tags and ``latest``."""
    return Path(cfg.training.run_dir) / "checkpoints"


def latest_tag(root: Path) -> str | None:
    """The tag ``latest`` points at, or None when no checkpoint completed."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(
    engine: TrainEngine, loader: PackedLoader, ctx: ParallelContext, cfg: ModusConfig, root: Path, state: TrainerState
) -> str:
    """Save on every rank (collective), then move ``latest`` to the new tag; returns the tag."""
    tag = f"step_{state.step:08d}"
    engine.engine.save_checkpoint(str(root), tag=tag, client_state={"step": state.step}, save_latest=False)
    tag_dir = root / tag
    (tag_dir / "extras").mkdir(parents=True, exist_ok=True)
    extras = {"rng": _rng_state(), "loader": loader.state_dict()}
    if engine.ema is not None:
        extras["ema"] = engine.ema.state_dict()
    _atomic_torch_save(extras, tag_dir / "extras" / f"rank_{ctx.rank:05d}.pt")
    if ctx.is_main:
        record = {**dataclasses.asdict(state), "config": config_to_dict(cfg)}
        _atomic_write_text(tag_dir / TRAINER_STATE, json.dumps(record, indent=2) + "\n")
    ctx.barrier()  # every rank's shards are on disk before the pointer moves
    if ctx.is_main:
        _atomic_write_text(root / LATEST, tag)
    ctx.barrier()
    return tag


def load_checkpoint(engine: TrainEngine, loader: PackedLoader, ctx: ParallelContext, root: Path) -> TrainerState | None:
    """Restore model, optimizer, loader and RNGs from the tag ``latest`` names; None when there is none."""
    tag = latest_tag(root)
    if tag is None:
        return None
    tag_dir = root / tag
    load_path, _ = engine.engine.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"DeepSpeed found no checkpoint in {tag_dir} although {root / LATEST} names it; "
                         f"delete {root / LATEST} to start over or point it at a complete tag")  # fmt: skip
    record = json.loads((tag_dir / TRAINER_STATE).read_text())
    extras_path = tag_dir / "extras" / f"rank_{ctx.rank:05d}.pt"
    if not extras_path.is_file():
        raise ValueError(
            f"{extras_path} is missing: {tag_dir} was saved with fewer ranks than this run has "
            f"({ctx.world_size}); resume with the saved layout (see {tag_dir / TRAINER_STATE})"
        )
    extras = torch.load(extras_path, weights_only=True)
    loader.load_state_dict(extras["loader"])
    _set_rng_state(extras["rng"])
    if engine.ema is not None and "ema" in extras:
        engine.ema.load_state_dict(extras["ema"])
    elif engine.ema is not None:
        engine.ema.reset()  # saved without EMA: the average starts at the restored weights
    return TrainerState(**{f.name: record[f.name] for f in dataclasses.fields(TrainerState)})


class PreemptionSignal:
    """Records SIGTERM / SIGUSR1 (SLURM preemption) so the loop can checkpoint and stop cleanly.

    Used as a context manager; the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None  # the signal number, once one arrived
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
