"""Where a training run keeps its checkpoints: the directory layout, read and written by name.

The one place that names the files of a run's checkpoints, so that training (which writes
and resumes them, ``training/checkpoint.py``) and conversion (which reads them,
``convert/deepspeed_run.py`` and ``convert/universal.py``) agree without importing each
other. Layout under ``<run_dir>/checkpoints/``::

    step_00000040/               one tag per save (DeepSpeed's files: model and optimizer shards)
        trainer_state.json       the step, the skipped-step counters, deepspeed_bf16 and the resolved config
        extras/rank_00000.pt     per rank: RNG states, the loader's state, this rank's EMA pieces
        universal/               optional: the tag as full tensors, for another layout (convert/universal.py)
    latest                       the tag to resume from

Only paths, names and the saved layout live here: no torch, no DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from modus_mega.config import ModusConfig

CHECKPOINTS_DIR = "checkpoints"  # <run_dir>/checkpoints: the tags and ``latest``
LATEST = "latest"  # <checkpoints>/latest: the tag to resume from
TRAINER_STATE = "trainer_state.json"  # <tag>/trainer_state.json
EXTRAS_DIR = "extras"  # <tag>/extras/rank_{rank:05d}.pt
UNIVERSAL_DIR = "universal"  # <tag>/universal: the tag as full tensors (convert/universal.py)
OPTIMIZER_PARAM_NAMES = "optimizer_param_names"  # key of DeepSpeed's model-states file: names in optimizer order


@dataclass(frozen=True)
class Layout:
    """The parallel layout whose shards a checkpoint's files are."""

    tp: int
    pp: int
    dp: int
    zero_stage: int

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """The global rank of these coordinates (``ParallelContext``'s order: tp fastest, then dp, then pp)."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def __str__(self) -> str:
        return f"tp={self.tp}, pp={self.pp}, dp={self.dp}, ZeRO {self.zero_stage}"


def checkpoint_root(cfg: ModusConfig) -> Path:
    """The directory holding this run's checkpoint tags and ``latest``."""
    return run_checkpoints(cfg.training.run_dir)


def run_checkpoints(run_dir: str | Path) -> Path:
    """The checkpoint directory of the run in ``run_dir``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def extras_file(tag_dir: Path, rank: int) -> Path:
    """Global rank ``rank``'s extras (RNG, loader, EMA pieces) in the tag ``tag_dir``."""
    return tag_dir / EXTRAS_DIR / f"rank_{rank:05d}.pt"


def saved_layout(tag_dir: Path) -> Layout:
    """The layout the tag ``tag_dir`` was saved at: its config's tp, pp and ZeRO stage, dp from its extras files."""
    parallel = json.loads((tag_dir / TRAINER_STATE).read_text())["config"]["parallel"]
    tp, pp = parallel["tp"], parallel["pp"]
    world_size = len(list((tag_dir / EXTRAS_DIR).glob("rank_*.pt")))
    if world_size == 0 or world_size % (tp * pp):
        raise ValueError(
            f"{tag_dir / EXTRAS_DIR} holds {world_size} rank files, not a multiple of tp * pp = {tp} * {pp} "
            f"(see {tag_dir / TRAINER_STATE}); the checkpoint is incomplete: use an earlier tag"
        )
    return Layout(tp, pp, world_size // (tp * pp), parallel["zero_stage"])


def latest_tag(root: Path) -> str | None:
    """The tag ``latest`` points at, or None when no checkpoint completed."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def resumes_from_checkpoint(cfg: ModusConfig) -> bool:
    """Whether the run will continue from its own checkpoint (``training.resume`` and a ``latest`` exists)."""
    return cfg.training.resume and latest_tag(checkpoint_root(cfg)) is not None
