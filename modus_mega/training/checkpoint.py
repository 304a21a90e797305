"""Training checkpoints: DeepSpeed's model and optimizer state plus what exact resume needs.

The directory layout under ``<run_dir>/checkpoints/`` (tags, ``latest``, ``trainer_state.json``,
per-rank extras, ``universal/``) is named in ``modus_mega/checkpoint_layout.py``, which the
converters read too; every tag ends with a ``manifest.json`` of its files' sizes and CRC-32s,
written last (``checkpoint_integrity.py``), and ``latest`` only ever names a tag with one. The extras hold RNG states (torch, CUDA, Python, NumPy), the loader's
state and this rank's EMA pieces (``parallel/ema.py``) when training.ema_decay > 0.

With pp > 1 the same calls save and load the pipeline engine, which writes the model per
stage: ``layer_<stage>-model_<tp>-model_states.pt`` (by dp rank 0 of each stage; keys are
the model's global parameter names, ``parallel/pipeline.py``), plus one
``mp_rank_<i>_model_states.pt`` per (stage, tp) rank for the rest of the engine's state.
That file also records the global names of the parameters the optimizer updates, in its
order (``OPTIMIZER_PARAM_NAMES``): at ZeRO 0 DeepSpeed saves torch's optimizer state, which
knows its parameters by position only.

``latest`` is replaced atomically, and only after every rank finished writing the tag, so
a crash during a save leaves the previous checkpoint as ``latest``. DeepSpeed's own
``latest`` is not written (``save_latest=False``); ours has the same name and format, so
DeepSpeed's tools (``zero_to_fp32.py``) still find it.

Data position: ``PackedLoader.state_dict()`` (per rank: each dp rank reads its own part of
the data); the noise of each micro-batch is seeded by its place in the run. Together with
the restored optimizer state this makes a resumed CPU run reproduce the uninterrupted
losses exactly.

Resuming in another precision: the weights and their keys are the same at every
``training.precision``, but DeepSpeed keeps the optimizer in its bf16 wrapper when ``bf16``
is on and saves that wrapper's state, so a tag records ``deepspeed_bf16`` and a same-layout
resume across fp32 and bf16/fp8 is refused with the fix; bf16 and fp8 resume into each other.

Resuming at another layout. A tag's files are shards of one (tp, pp, dp, ZeRO stage)
layout (``Layout``; dp is the number of extras files over tp * pp). ``load_checkpoint``
compares it with the running one: the same layout loads DeepSpeed's files directly; any
other needs the tag's universal form (``python -m modus_mega.convert universal <tag>``),
from which each rank takes its own slices of the full weights, Adam moments and EMA
(``convert/universal.py``), and the loader state and RNG of the saved rank with the same
dp rank. The data position is per dp rank (its shard readers, their positions, its packer's
waiting documents): with another dp degree or ``data.num_workers``, every saved dp rank's
loader state is read and resharded (``data/reshard.py``): within the pass in progress no
sample is lost or repeated, but the batches differ from the uninterrupted run's. The RNG
states then come from saved dp rank 0 (no step draws from them: each micro-batch's noise
has its own generator, ``training/loop.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from modus_mega.checkpoint_integrity import (
    apply_retention,
    atomic_write_text,
    clean_stale,
    find_resume_tag,
    tag_for_step,
    tensor_bytes,
    write_errors,
    write_manifest,
)
from modus_mega.checkpoint_layout import (
    EXTRAS_DIR,
    LATEST,
    OPTIMIZER_PARAM_NAMES,
    TRAINER_STATE,
    UNIVERSAL_DIR,
    Layout,
    extras_file,
    latest_tag,
    saved_layout,
)
from modus_mega.config import ModusConfig, config_to_dict
from modus_mega.convert.universal import load_universal
from modus_mega.data.loader import PackedLoader
from modus_mega.data.reshard import reshard
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.pipeline import ModusPipeline, global_parameter_name
from modus_mega.safe_loading import WeightsOnlyCheckpointEngine, safe_load
from modus_mega.training.engine import TrainEngine

logger = logging.getLogger(__name__)

BF16_OPTIMIZER = "deepspeed_bf16"  # trainer_state.json: whether DeepSpeed's bf16 optimizer saved the tag


@dataclass
class TrainerState:
    """Where a run stands: what a resumed run continues from."""

    step: int  # optimizer steps completed
    skipped_steps: int = 0  # of those, skipped for a non-finite loss or gradient (training/failures.py)
    bad_in_a_row: int = 0  # the non-finite streak the last steps ended with


def save_checkpoint(
    engine: TrainEngine, loader: PackedLoader, ctx: ParallelContext, cfg: ModusConfig, root: Path, state: TrainerState
) -> str:
    """Save on every rank (collective), write the tag's manifest, move ``latest`` to it, apply retention; returns the tag."""
    WeightsOnlyCheckpointEngine.install(engine.engine)  # a full disk or read-only directory is named
    tag = tag_for_step(state.step)
    client_state = {"step": state.step, OPTIMIZER_PARAM_NAMES: _optimizer_param_names(engine)}
    engine.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    tag_dir = root / tag
    with write_errors(tag_dir / EXTRAS_DIR, 0, is_directory=True):
        (tag_dir / EXTRAS_DIR).mkdir(parents=True, exist_ok=True)
    extras = {"rng": _rng_state(), "loader": loader.state_dict()}
    if engine.ema is not None:
        extras["ema"] = engine.ema.state_dict()
    _atomic_torch_save(extras, extras_file(tag_dir, ctx.rank))
    if ctx.is_main:
        bf16 = engine.engine.bfloat16_enabled()
        record = {**dataclasses.asdict(state), BF16_OPTIMIZER: bf16, "config": config_to_dict(cfg)}
        atomic_write_text(tag_dir / TRAINER_STATE, json.dumps(record, indent=2) + "\n")
    ctx.barrier()  # every rank's shards are on disk before the manifest and the pointer
    required = [TRAINER_STATE] + [extras_file(tag_dir, r).relative_to(tag_dir).as_posix() for r in range(ctx.world_size)]
    write_manifest(tag_dir, required)  # collective: the ranks share the checksums
    if ctx.is_main:
        atomic_write_text(root / LATEST, tag)
        apply_retention(root, cfg.training.keep_last, cfg.training.keep_every)
    ctx.barrier()
    return tag


def load_checkpoint(
    engine: TrainEngine, loader: PackedLoader, ctx: ParallelContext, root: Path, fallback: bool = False
) -> TrainerState | None:
    """Restore model, optimizer, EMA, loader and RNGs from the tag ``latest`` names; None when there is none.

    Interrupted writes are removed first; the tag must match its manifest, else
    ``DamagedCheckpointError`` proposes the newest complete tag, which ``fallback`` takes
    (``checkpoint_integrity.find_resume_tag``). Every file is loaded weights-only
    (``safe_loading``): a file holding any other pickled object is refused, naming it.

    A tag saved at this run's layout is loaded directly; one saved at another layout from its
    universal form, which ``python -m modus_mega.convert universal`` writes. The data position
    continues exactly at the same dp and ``data.num_workers``, and is resharded at others.
    Raises ``ValueError`` naming both layouts when the universal form is missing.
    """
    WeightsOnlyCheckpointEngine.install(engine.engine)
    if ctx.is_main:
        clean_stale(root)
    ctx.barrier()  # no rank reads what rank 0 removes
    tag = find_resume_tag(root, fallback)
    if tag is None:
        return None
    tag_dir = root / tag
    saved = saved_layout(tag_dir)
    current = Layout(ctx.tp, ctx.pp, ctx.dp, engine.engine.zero_optimization_stage())
    if saved == current:
        _check_optimizer_precision(engine, tag_dir)
        extras = _load_same_layout(engine, root, tag, ctx.rank)
    else:
        extras = _load_other_layout(engine, tag_dir, saved, current, ctx)
    _restore_data_position(loader, extras["loader"], tag_dir, saved, ctx)
    _set_rng_state(extras["rng"])
    record = json.loads((tag_dir / TRAINER_STATE).read_text())
    return TrainerState(**{f.name: record[f.name] for f in dataclasses.fields(TrainerState)})


def _check_optimizer_precision(engine: TrainEngine, tag_dir: Path) -> None:
    """Raise ``ValueError`` when the tag's DeepSpeed optimizer state has another form than this run's.

    The weights are the same at every precision, but DeepSpeed wraps the optimizer in its bf16
    optimizer when ``bf16`` is on (``training.precision`` bf16 or fp8, or auto on a GPU) and
    saves that wrapper's state, which the fp32 form cannot load (and vice versa). bf16 and fp8
    share the form, so a run moves between them freely. Tags saved before the field: unchecked.
    """
    saved = json.loads((tag_dir / TRAINER_STATE).read_text()).get(BF16_OPTIMIZER)
    running = engine.engine.bfloat16_enabled()
    if saved is None or saved == running:
        return
    resume_with = "training.precision=bf16 or fp8" if saved else "training.precision=fp32"
    raise ValueError(
        f"{tag_dir} was saved with DeepSpeed's bf16 optimizer {'on' if saved else 'off'} and this run has it "
        f"{'on' if running else 'off'} (on for training.precision bf16 and fp8, and auto on a GPU): the optimizer "
        f"state differs in form; resume with {resume_with}, or set training.resume=false to start over"
    )


def _load_same_layout(engine: TrainEngine, root: Path, tag: str, rank: int) -> dict[str, Any]:
    """DeepSpeed's own files and this rank's EMA; returns this rank's extras."""
    load_path, _ = engine.engine.load_checkpoint(str(root), tag=tag, load_lr_scheduler_states=False)
    if load_path is None:
        raise ValueError(f"DeepSpeed found no checkpoint in {root / tag} although {root / LATEST} names it; "
                         f"delete {root / LATEST} to start over or point it at a complete tag")  # fmt: skip
    extras = _read_extras(extras_file(root / tag, rank))
    if engine.ema is not None and "ema" in extras:
        engine.ema.load_state_dict(extras["ema"])
    elif engine.ema is not None:
        engine.ema.reset()  # saved without EMA: the average starts at the restored weights
    return extras


def _load_other_layout(
    engine: TrainEngine, tag_dir: Path, saved: Layout, current: Layout, ctx: ParallelContext
) -> dict[str, Any]:
    """The tag's universal form (weights, Adam state, EMA); returns the extras of the saved rank with this dp rank.

    With another dp degree: saved dp rank 0's (its RNG states; the data position is resharded from all).
    """
    universal = tag_dir / UNIVERSAL_DIR
    if not universal.is_dir():
        raise ValueError(
            f"{tag_dir} was saved at {saved}, but this run has {current}: another layout resumes from the "
            f"tag's universal form, which is missing; write it with\n"
            f"    python -m modus_mega.convert universal {tag_dir}\n"
            f"and relaunch (or resume at the saved layout)"
        )
    load_universal(engine.engine, engine.optimizer, engine.ema, universal, ctx)
    # Every tp and pp rank of a dp rank reads the same data: any of the saved ones carries its position.
    dp_rank = ctx.dp_rank if saved.dp == current.dp else 0  # another dp: the position is resharded from all
    return _read_extras(extras_file(tag_dir, saved.rank(tp_rank=0, dp_rank=dp_rank, pp_rank=0)))


def _restore_data_position(
    loader: PackedLoader, own: dict[str, Any], tag_dir: Path, saved: Layout, ctx: ParallelContext
) -> None:
    """``own``, a saved state of this dp rank, at the same loader layout; else every saved dp rank's, resharded."""
    if own["layout"] == loader.layout:
        loader.load_state_dict(own)
        return
    states = [
        _read_extras(extras_file(tag_dir, saved.rank(tp_rank=0, dp_rank=dp_rank, pp_rank=0)), mmap=True)["loader"]
        for dp_rank in range(saved.dp)
    ]
    resharded = reshard(states, ctx.dp, loader.num_logical_workers, loader.source.num_shards)
    loader.load_state_dict(resharded[ctx.dp_rank])
    if ctx.is_main:
        pieces = sum(len(position["carried"]) for state in resharded for position in state["positions"])
        pending = sum(len(state["pending"]) for state in resharded)
        logger.warning(
            "data position resharded from dp=%d (readers: %d) to dp=%d (readers: %d): %d carried-over shard "
            "pieces, %d pending samples; no sample of the pass in progress is lost or repeated, but the batches "
            "differ from the uninterrupted run's",
            saved.dp, saved.dp * own["layout"]["num_workers"], ctx.dp, loader.num_slots, pieces, pending,
        )  # fmt: skip


def _read_extras(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A rank's extras; ``mmap``: leave its EMA pieces on disk (when only the loader state is needed)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint is incomplete (a rank did not save); use an earlier tag")
    return safe_load(path, mmap=mmap)


def _optimizer_param_names(engine: TrainEngine) -> list[str]:
    """Global names of the parameters the optimizer updates, in its order (``training/engine.py`` builds it so)."""
    rename = global_parameter_name if isinstance(engine.model, ModusPipeline) else str
    return [rename(name) for name, param in engine.model.named_parameters() if param.requires_grad]


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


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with write_errors(path, tensor_bytes(obj)):
        torch.save(obj, tmp)
        os.replace(tmp, path)
