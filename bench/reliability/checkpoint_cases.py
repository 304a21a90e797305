"""The checkpoint rows of the fault matrix (``bench/reliability/faults.py``): tampered files, truncations, bit
flips, missing files, damaged pointers, full disk, read-only.

One CPU process trains the tiny model for 4 steps at ZeRO 1 (checkpoints after steps 2
and 4) and builds one engine (``open_bench``); every case copies that run's checkpoints,
injects one fault and drives the real code (``training/checkpoint.py``'s save and load,
DeepSpeed's engine included), then checks what a user must see. A case is *held* when:

- ``tampered``: a file of the step-4 tag (DeepSpeed's model states, its ZeRO optimizer
  partition, a rank's extras) holds an object whose ``__reduce__`` would create a marker
  file, its manifest rewritten to match: the resume is refused naming that file and the
  marker never appears. Without the manifest rewritten, the checksum refuses it first.
- ``truncated`` / ``bit_flip`` / ``missing``: a file of the step-4 tag truncated at a random
  offset, one byte flipped, or the file deleted: the resume is refused naming step 4 and
  proposing step 2, and ``fallback`` resumes at step 2.
- ``pointer``: ``latest`` naming a missing tag, empty, garbage, or gone: refused naming
  ``latest`` and proposing step 4; ``fallback`` resumes at step 4.
- ``disk_full``: ENOSPC at each write of a save (DeepSpeed's model and optimizer files, the
  extras, ``trainer_state.json``, the manifest, ``latest``; and torch's ``unexpected pos``
  on a full disk): the save raises ``CheckpointWriteError`` naming the file and "no space
  left", ``latest`` still names step 4, and the next resume (which removes the partial tag)
  is at step 4.
- ``read_only``: a file where the tag or its extras directory belongs, EROFS on every
  write, EACCES when ``latest`` is replaced (tests run as root, whom chmod does not stop):
  the same, with "not writable" or "is not a directory".

Each ``case_*`` returns True when held; ``checkpoint_cases(kind, bench, count)`` lists a
class's cases (``KINDS``), random ones ``count`` times per file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from megatron.core import parallel_state

import modus_mega.checkpoint_integrity as integrity
from modus_mega.checkpoint_integrity import (
    LATEST,
    MANIFEST,
    CheckpointWriteError,
    DamagedCheckpointError,
    read_manifest,
    tags,
    write_manifest,
)
from modus_mega.checkpoint_layout import latest_tag
from modus_mega.config import ModusConfig, load_config
from modus_mega.data.loader import PackedLoader
from modus_mega.parallel.context import ParallelContext
from modus_mega.safe_loading import UnsafeCheckpointError, safe_load
from modus_mega.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from modus_mega.training.engine import TrainEngine, build_engine
from modus_mega.training.loop import train

REPO = Path(__file__).resolve().parents[2]
DAMAGED, GOOD = "step_00000004", "step_00000002"


class Evil:
    """Unpickling this runs a shell command that creates ``marker``: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


@dataclass
class Bench:
    """The trained run every case copies, and the engine and loader every case loads into."""

    cfg: ModusConfig
    ctx: ParallelContext
    engine: TrainEngine
    loader: PackedLoader
    source: Path  # the trained run's checkpoint directory (tags step 2 and 4)
    work: Path  # where cases copy it
    rng: random.Random
    num_cases: int = 0

    def copy(self) -> Path:
        """A fresh copy of the trained checkpoints."""
        self.num_cases += 1
        root = self.work / f"case_{self.num_cases:04d}"
        shutil.copytree(self.source, root)
        return root

    def resume(self, root: Path, fallback: bool = False) -> TrainerState | None:
        """``load_checkpoint`` from ``root``, as a resumed run calls it."""
        return load_checkpoint(self.engine, self.loader, self.ctx, root, fallback)

    def save(self, root: Path, step: int) -> None:
        """``save_checkpoint`` of the loaded state as step ``step`` into ``root``."""
        save_checkpoint(self.engine, self.loader, self.ctx, self.cfg, root, TrainerState(step=step))


@contextlib.contextmanager
def open_bench(out: Path, rng: random.Random) -> Iterator[Bench]:
    """Train the tiny run whose checkpoints every case damages in ``out``, and build the engine that loads them;
    Megatron's groups are destroyed afterwards (the process group stays, for the next class)."""
    overrides = ["training.steps=4", "training.checkpoint_every=2", "training.log_every=1",
                 "parallel.zero_stage=1", "data.token_budget=256", f"training.run_dir={out / 'run'}"]  # fmt: skip
    cfg = load_config(REPO / "configs" / "tiny.json", overrides)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        train(cfg, ctx)
        engine = build_engine(cfg, ctx)
        loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, engine.model.vocab, ctx.dp_rank, ctx.dp)
        work = out / "cases"
        shutil.rmtree(work, ignore_errors=True)
        yield Bench(cfg, ctx, engine, loader, out / "run" / "checkpoints", work, rng)
    finally:
        parallel_state.destroy_model_parallel()


def tag_files(bench: Bench, tag: str = DAMAGED) -> list[str]:
    """The files of a trained tag, as its manifest lists them."""
    return sorted(read_manifest(bench.source / tag)["files"])  # type: ignore[index]


# ----------------------------------------------------------------------------- outcome checks


def refused_then_fallback(bench: Bench, root: Path, named: str, proposed: str) -> bool:
    """The resume is refused naming ``named`` and proposing ``proposed``; ``fallback`` resumes there."""
    try:
        bench.resume(root)
        return False
    except DamagedCheckpointError as e:
        if named not in str(e) or f"newest complete tag is {proposed}" not in str(e):
            return False
    state = bench.resume(root, fallback=True)
    return state is not None and f"step_{state.step:08d}" == proposed and latest_tag(root) == proposed


def save_fails_cleanly(
    bench: Bench,
    root: Path,
    inject: Callable[[], contextlib.AbstractContextManager],
    words: str,
    prepare: Callable[[], object] = lambda: None,
) -> bool:
    """After a resume and ``prepare()``, a save of step 6 under ``inject`` raises CheckpointWriteError saying
    ``words`` and a path; ``latest`` still names step 4, the next resume is there, and no partial step-6 tag is left."""
    bench.resume(root)
    prepare()
    try:
        with inject():
            bench.save(root, 6)
        return False
    except CheckpointWriteError as e:
        said = words in str(e) and str(root) in str(e)
    state = bench.resume(root)  # removes the partial tag first
    resumed = state is not None and state.step == 4
    partial_left = "step_00000006" in tags(root) and read_manifest(root / "step_00000006") is None
    return said and resumed and latest_tag(root) == DAMAGED and not partial_left


# ----------------------------------------------------------------------------- cases


def case_tampered(bench: Bench, name: str, update_manifest: bool = True) -> bool:
    """``name`` in step 4 holds a command-running object; refused by name (or by checksum), the command never runs."""
    root = bench.copy()
    marker, path = root / "marker", root / DAMAGED / name
    torch.save({**safe_load(path), "args": Evil(marker)}, path)
    if update_manifest:
        (root / DAMAGED / MANIFEST).unlink()
        write_manifest(root / DAMAGED, [])
    try:
        bench.resume(root)
        held = False
    except UnsafeCheckpointError as e:
        held = update_manifest and str(path) in str(e)
    except DamagedCheckpointError as e:
        held = not update_manifest and name in str(e)
    return held and not marker.exists()


def case_truncated(bench: Bench, name: str) -> bool:
    """``name`` in step 4 cut at a random offset."""
    root = bench.copy()
    path = root / DAMAGED / name
    data = path.read_bytes()
    path.write_bytes(data[: bench.rng.randrange(len(data))])
    return refused_then_fallback(bench, root, DAMAGED, GOOD)


def case_bit_flip(bench: Bench, name: str) -> bool:
    """One random byte of ``name`` in step 4 changed (the size stays: only the checksum sees it)."""
    root = bench.copy()
    path = root / DAMAGED / name
    data = bytearray(path.read_bytes())
    data[bench.rng.randrange(len(data))] ^= 1 << bench.rng.randrange(8)
    path.write_bytes(bytes(data))
    return refused_then_fallback(bench, root, DAMAGED, GOOD)


def case_missing(bench: Bench, name: str) -> bool:
    """``name`` deleted from step 4 (``manifest.json`` included: the save never completed)."""
    root = bench.copy()
    (root / DAMAGED / name).unlink()
    return refused_then_fallback(bench, root, DAMAGED, GOOD)


POINTERS = {"names a missing tag": "step_00000099", "is empty": "", "holds garbage": "\x00garbage", "is deleted": None}


def case_pointer(bench: Bench, damage: str) -> bool:
    """``latest`` damaged (``POINTERS``); the tags are fine, so step 4 is proposed."""
    root = bench.copy()
    text = POINTERS[damage]
    if text is None:
        (root / LATEST).unlink()
    else:
        (root / LATEST).write_text(text)
    return refused_then_fallback(bench, root, LATEST, DAMAGED)


@contextlib.contextmanager
def failing_writes(match: str, error: BaseException) -> Iterator[None]:
    """Every ``torch.save`` or text write of a path containing ``match`` raises ``error`` (after writing a little)."""
    save, write_text = torch.save, Path.write_text

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if match in str(f):
            Path(f).write_bytes(b"PK\x03\x04 torn")
            raise error
        save(obj, f, *args, **kwargs)

    def failing_write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if match in str(self):
            raise error
        return write_text(self, data, *args, **kwargs)

    torch.save, Path.write_text = failing_save, failing_write_text  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.save, Path.write_text = save, write_text  # type: ignore[method-assign]


@contextlib.contextmanager
def failing_replace(match: str, error: BaseException) -> Iterator[None]:
    """``os.replace`` onto a path containing ``match`` raises ``error``."""
    replace = os.replace

    def failing(src: Any, dst: Any) -> None:
        if match in str(dst):
            raise error
        replace(src, dst)

    os.replace = failing
    try:
        yield
    finally:
        os.replace = replace


@contextlib.contextmanager
def full_disk_zip_error(match: str) -> Iterator[None]:
    """torch's zip writer on a full disk: ``RuntimeError ... unexpected pos``, and no free bytes left."""
    free = integrity._free_bytes
    integrity._free_bytes = lambda path: 0  # type: ignore[assignment]
    try:
        with failing_writes(match, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 615296 vs 615184")):
            yield
    finally:
        integrity._free_bytes = free  # type: ignore[assignment]


NO_SPACE = OSError(errno.ENOSPC, "No space left on device")
DISK_FULL_AT = ["model_states", "optim_states", "extras", "trainer_state.json", MANIFEST, LATEST]


def case_disk_full(bench: Bench, at: str) -> bool:
    """ENOSPC when the save writes a path containing ``at``."""
    return save_fails_cleanly(bench, bench.copy(), lambda: failing_writes(at, NO_SPACE), "no space left")


def case_disk_full_zip_writer(bench: Bench) -> bool:
    """A full disk as torch reports it (``unexpected pos``) while DeepSpeed writes the model states."""
    return save_fails_cleanly(bench, bench.copy(), lambda: full_disk_zip_error("model_states"), "no space left")


def case_read_only(bench: Bench, how: str) -> bool:
    """The checkpoint directory cannot be written: ``how`` is one of ``READ_ONLY``."""
    root = bench.copy()
    tag_dir = root / "step_00000006"
    prepare: Callable[[], object] = lambda: None
    if how == "file where the tag belongs":
        inject, words, prepare = contextlib.nullcontext, "is not a directory", lambda: tag_dir.write_text("")
    elif how == "file where extras belong":
        inject, words = contextlib.nullcontext, "is not a directory"
        prepare = lambda: (tag_dir.mkdir(), (tag_dir / "extras").write_text(""))  # noqa: E731
    elif how == "read-only file system":
        inject, words = lambda: failing_writes("step_00000006", OSError(errno.EROFS, "Read-only file system")), "not writable"
    else:  # "latest not replaceable"
        inject, words = lambda: failing_replace(LATEST, PermissionError(errno.EACCES, "Permission denied")), "not writable"
    return save_fails_cleanly(bench, root, inject, words, prepare)


READ_ONLY = ["file where the tag belongs", "file where extras belong", "read-only file system", "latest not replaceable"]


# ----------------------------------------------------------------------------- the classes

KINDS = ("tampered", "truncated", "bit_flip", "missing", "pointer", "disk_full", "read_only")


def checkpoint_cases(kind: str, bench: Bench, count: int) -> Iterator[tuple[str, Callable[[], bool]]]:
    """The cases of ``kind`` (one of ``KINDS``) as (name, check); truncations and bit flips ``count`` per file."""
    files = tag_files(bench)
    if kind == "tampered":
        for name in (name for name in files if name.endswith(".pt")):
            yield name, lambda n=name: case_tampered(bench, n)
            yield f"{name} (manifest not updated)", lambda n=name: case_tampered(bench, n, False)
    elif kind in ("truncated", "bit_flip"):
        case = case_truncated if kind == "truncated" else case_bit_flip
        for name in files:
            for _ in range(count):
                yield name, lambda n=name: case(bench, n)
    elif kind == "missing":
        for name in files + [MANIFEST]:
            yield name, lambda n=name: case_missing(bench, n)
    elif kind == "pointer":
        for damage in POINTERS:
            yield f"latest {damage}", lambda d=damage: case_pointer(bench, d)
    elif kind == "disk_full":
        for at in DISK_FULL_AT:
            yield f"ENOSPC writing {at}", lambda a=at: case_disk_full(bench, a)
        yield "torch's zip writer on a full disk", lambda: case_disk_full_zip_writer(bench)
    elif kind == "read_only":
        for how in READ_ONLY:
            yield how, lambda h=how: case_read_only(bench, h)
    else:
        raise ValueError(f"unknown checkpoint fault kind {kind!r}; choose one of {KINDS}")
