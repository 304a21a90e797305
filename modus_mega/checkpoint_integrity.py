"""Checkpoint integrity: per-tag manifests, choosing a verified tag to resume, clean-up, retention, write errors.

A training checkpoint is a directory of tags under ``<run_dir>/checkpoints/`` plus a
``latest`` file naming one of them (``training/checkpoint.py`` writes them). This module
knows only that layout's generic rules, so it depends on the standard library and torch:

- **Manifest.** Every tag gets ``manifest.json`` LAST, after every rank finished writing:
  each file's size and CRC-32. ``latest`` moves only after it, so it only ever names a
  verified tag. CRC-32, not SHA-256: the faults to catch are accidental (torn writes,
  truncation, a lost file, bit rot), which CRC-32 detects (every burst up to 32 bits, a random
  change with probability 1 - 2^-32); an attacker who can write a file can rewrite the
  manifest too, so a cryptographic hash would buy nothing there (the weights-only loader,
  ``safe_loading.py``, is that defence). CRC-32 hashes about twice as fast as SHA-256 here
  (zlib 1.05 GB/s vs hashlib 0.55 GB/s on one core). The ranks share the work: rank r
  hashes files r, r + world, ..., so a 7B tag (about 200 GB with Adam states) costs each of
  256 ranks about a second.
- **Resume.** ``find_resume_tag`` verifies the tag ``latest`` names (sizes on rank 0, the
  checksums spread over the ranks, one verdict for all). A damaged or incomplete one is
  refused with the tag, the problem and the newest complete tag; ``training.resume:
  fallback`` takes that tag itself, logs it, renames the damaged tags to ``<tag>.damaged``
  (kept for inspection, no longer tags) and points ``latest`` at the good one.
- **Clean-up at start** (rank 0, before anyone reads): ``*.tmp`` files (interrupted atomic
  writes) and partial tags: tags without a manifest newer than the one ``latest`` names (or
  any, when ``latest`` names none): a save that never completed. Complete newer tags are kept
  (a crash between the manifest and ``latest``, or a user who pointed ``latest`` back), and
  so are older tags without a manifest (they may predate manifests; retention removes them).
- **Retention** (``training.keep_last``, ``training.keep_every``): after ``latest`` moved to
  a new verified tag, older tags beyond the newest ``keep_last`` are deleted unless their
  step is a multiple of ``keep_every``; the tag ``latest`` names and newer ones never are.
- **Write errors.** ``write_errors`` turns a full disk or a read-only / permission-denied
  directory during a save into one ``CheckpointWriteError`` naming the path, the bytes
  needed and the bytes free, with the fix. torch's zip writer reports a full disk as
  ``RuntimeError: ... unexpected pos`` and a missing directory as "Parent directory ...
  does not exist"; both are checked against the file system's free space and permissions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from modus_mega.checkpoint_layout import LATEST, latest_tag

MANIFEST = "manifest.json"  # <tag>/manifest.json: every file's size and CRC-32, written last
TMP_SUFFIX = ".tmp"  # an atomic write in progress: <file>.tmp, renamed over <file> when complete
DAMAGED_SUFFIX = ".damaged"  # a damaged tag set aside by training.resume=fallback
_TAG = re.compile(r"step_(\d{8})")  # tag_for_step's names
_CHUNK = 16 << 20  # bytes hashed per read

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DamagedCheckpointError(ValueError):
    """The tag ``latest`` names is missing, incomplete or corrupt (the message names it and the way out)."""


class CheckpointWriteError(RuntimeError):
    """A save failed for lack of space or permission (the message names the path, the space and the fix)."""


def tag_for_step(step: int) -> str:
    """The tag of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def tag_step(name: str) -> int | None:
    """The step of the tag called ``name``; None when ``name`` is not a tag's name."""
    match = _TAG.fullmatch(name)
    return int(match.group(1)) if match else None


def tags(root: Path) -> list[str]:
    """The tag directories in ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and tag_step(p.name) is not None), key=tag_step)


# ----------------------------------------------------------------------------- manifests


def write_manifest(tag_dir: Path, required: list[str]) -> None:
    """Record every file of ``tag_dir`` (size, CRC-32) in its manifest; collective, rank 0 writes.

    Call on every rank after every rank's files are closed (after a barrier). ``required``
    (paths relative to the tag) must be among them: a rank whose files are missing made
    the tag incomplete, and raises here instead of leaving a manifest that hides it.
    """
    files = _broadcast(lambda: _list_files(tag_dir))
    missing = sorted(set(required) - set(files))
    if missing:
        raise RuntimeError(f"{tag_dir} lacks {', '.join(missing)} after every rank saved; the tag is incomplete")
    checksums = _spread(files, lambda name: _crc32(tag_dir / name))
    if _rank() == 0:
        entries = {name: {"size": (tag_dir / name).stat().st_size, "crc32": checksums[name]} for name in files}
        record = {"files": entries, "total_bytes": sum(e["size"] for e in entries.values())}
        atomic_write_text(tag_dir / MANIFEST, json.dumps(record, indent=1) + "\n")


def read_manifest(tag_dir: Path) -> dict[str, Any] | None:
    """The manifest of ``tag_dir``; None when it has none or it does not parse."""
    try:
        record = json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def verify_tag(tag_dir: Path) -> str | None:
    """Why ``tag_dir`` cannot be resumed from, or None when every file matches its manifest; collective.

    Rank 0 checks the manifest, the files' presence and sizes; the checksums are spread over
    the ranks. Every rank returns the same verdict.
    """
    problem, files = _broadcast(lambda: _check_sizes(tag_dir))
    if problem is not None:
        return problem
    found = _spread(sorted(files), lambda name: _crc32(tag_dir / name))
    for name in sorted(files):
        if found[name] != files[name]["crc32"]:
            return f"{name} does not match its checksum in {MANIFEST} (the file was changed or corrupted)"
    return None


def _check_sizes(tag_dir: Path) -> tuple[str | None, dict[str, dict[str, int]]]:
    """(why the tag is incomplete or None, its manifest's files)."""
    if not tag_dir.is_dir():
        return "the tag directory does not exist", {}
    manifest = read_manifest(tag_dir)
    if manifest is None:
        what = "is unreadable" if (tag_dir / MANIFEST).exists() else "is missing"
        return f"its {MANIFEST} {what} (the save did not complete)", {}
    for name, entry in sorted(manifest["files"].items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing", {}
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, {entry['size']} when saved (truncated or overwritten)", {}
    return None, manifest["files"]


def _list_files(tag_dir: Path) -> list[str]:
    return sorted(
        p.relative_to(tag_dir).as_posix()
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(TMP_SUFFIX)
    )


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


# ----------------------------------------------------------------------------- choosing the tag to resume


def find_resume_tag(root: Path, fallback: bool) -> str | None:
    """The verified tag to resume from (None: no checkpoint, start fresh); collective.

    The tag ``latest`` names, when it verifies. Otherwise ``DamagedCheckpointError`` names it,
    the problem, and the newest complete tag; with ``fallback`` that tag is taken instead
    (logged), the damaged tags after it are renamed ``<tag>.damaged`` and ``latest`` names it.
    """
    named, candidates = _broadcast(lambda: _pointer_and_candidates(root))
    if named is None and not candidates:
        return None  # a fresh run (clean_stale removed any partial first save)
    if named is None:
        problem = f"{root / LATEST} is missing although complete tags exist"
    elif not named:
        problem = f"{root / LATEST} is empty"
    elif tag_step(named) is None:
        problem = f"{root / LATEST} holds {named!r}, which is not a tag name (step_NNNNNNNN)"
    else:
        reason = verify_tag(root / named)
        if reason is None:
            return named
        problem = f"checkpoint {root / named} (named by {root / LATEST}) cannot be resumed: {reason}"
    good = next((t for t in candidates if verify_tag(root / t) is None), None)
    if good is None:
        raise DamagedCheckpointError(
            f"{problem}; no complete tag remains in {root}: restore the files, or move {root} away to start over"
        )
    if not fallback:
        raise DamagedCheckpointError(
            f"{problem}; the newest complete tag is {good}: resume from it with --set training.resume=fallback "
            f"(or write {good} into {root / LATEST})"
        )
    if _rank() == 0:
        logger.warning("%s; training.resume=fallback: resuming from %s, the newest complete tag", problem, good)
        _set_aside_after(root, good)
        atomic_write_text(root / LATEST, good)
    _barrier()  # no rank reads the checkpoint directory while rank 0 renames in it
    return good


def _pointer_and_candidates(root: Path) -> tuple[str | None, list[str]]:
    """What ``latest`` holds, and the other tags with a manifest, newest first."""
    named = latest_tag(root)
    return named, [t for t in reversed(tags(root)) if t != named and read_manifest(root / t) is not None]


def _set_aside_after(root: Path, good: str) -> None:
    """Rename every tag newer than ``good`` to ``<tag>.damaged`` (kept for inspection; a new save reuses the name)."""
    for name in tags(root):
        if tag_step(name) > tag_step(good):  # type: ignore[operator]  # tags() holds tag names only
            aside = root / (name + DAMAGED_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            (root / name).rename(aside)
            logger.warning("set aside the damaged checkpoint %s as %s", root / name, aside)


# ----------------------------------------------------------------------------- clean-up and retention


def clean_stale(root: Path) -> list[Path]:
    """Remove interrupted writes from ``root`` (rank 0, before any rank reads it); returns what was removed.

    ``*.tmp`` files anywhere under it, and tags without a manifest that are newer than the
    one ``latest`` names (any, when it names none).
    """
    if not root.is_dir():
        return []
    removed = [p for p in root.rglob("*" + TMP_SUFFIX) if p.is_file()]
    for path in removed:
        path.unlink()
    named = latest_tag(root)
    latest_step = tag_step(named) if named else None
    for name in tags(root):
        newer = latest_step is None or tag_step(name) > latest_step  # type: ignore[operator]  # tags() holds tag names
        if newer and read_manifest(root / name) is None:
            shutil.rmtree(root / name)
            removed.append(root / name)
    if removed:
        logger.warning("removed %d interrupted checkpoint writes: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def apply_retention(root: Path, keep_last: int, keep_every: int) -> list[str]:
    """Delete tags older than ``latest``'s beyond the newest ``keep_last`` (0: keep all); returns the deleted tags.

    A tag whose step is a multiple of ``keep_every`` (> 0) is kept; the tag ``latest`` names
    and newer ones never are deleted. Rank 0, after ``latest`` moved to a verified tag.
    """
    named = latest_tag(root)
    if not keep_last or not named or tag_step(named) is None:
        return []
    older = [t for t in tags(root) if tag_step(t) < tag_step(named)]  # type: ignore[operator]
    expired = older[: max(len(older) - (keep_last - 1), 0)]  # the newest keep_last tags count latest's
    deleted = [t for t in expired if not (keep_every and tag_step(t) % keep_every == 0)]  # type: ignore[operator]
    for name in deleted:
        shutil.rmtree(root / name)
    return deleted


# ----------------------------------------------------------------------------- write errors

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)  # EEXIST, ENOTDIR: a file where a directory belongs


@contextlib.contextmanager
def write_errors(path: Path, needed_bytes: int, is_directory: bool = False) -> Iterator[None]:
    """Turn a failed write of ``path`` (about ``needed_bytes``) for lack of space or permission into one clear error.

    ``is_directory``: ``path`` is a directory being created (a file in its place is named).
    """
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise CheckpointWriteError(_no_space_message(path, needed_bytes)) from e
        if e.errno in _NO_PERMISSION:
            raise CheckpointWriteError(_no_permission_message(path, is_directory, e)) from e
        raise
    except RuntimeError as e:  # torch's zip writer hides the OSError
        if _free_bytes(path) < needed_bytes:
            raise CheckpointWriteError(_no_space_message(path, needed_bytes)) from e
        folder = _existing_folder(path, is_directory)
        if not os.access(folder, os.W_OK) or folder != path.parent:
            raise CheckpointWriteError(_no_permission_message(path, is_directory, e)) from e
        raise


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples: what saving ``obj`` needs, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``<path>.tmp`` and a rename: readers see the old or the new file."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with write_errors(path, len(text.encode())):
        tmp.write_text(text)
        os.replace(tmp, path)


def _no_space_message(path: Path, needed_bytes: int) -> str:
    return (
        f"no space left on the device writing {path}: it needs about {_size(needed_bytes)}, "
        f"{_size(_free_bytes(path))} are free there; free space, or lower training.keep_last, or point "
        "training.run_dir at a larger file system"
    )


def _no_permission_message(path: Path, is_directory: bool, error: BaseException) -> str:
    folder = _existing_folder(path, is_directory)
    what = "is not a directory" if folder.exists() and not folder.is_dir() else "is not writable"
    detail = f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else ""
    kind = "directory" if is_directory else "file"
    return (
        f"cannot write the checkpoint {kind} {path}: {folder} {what}{detail}; make the directory writable, "
        "or point training.run_dir elsewhere"
    )


def _existing_folder(path: Path, is_directory: bool = False) -> Path:
    """The nearest existing one of ``path`` (a directory being made) or its ancestors; a file there counts."""
    folder = path if is_directory else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _free_bytes(path: Path) -> int:
    folder = _existing_folder(path)
    return shutil.disk_usage(folder if folder.is_dir() else folder.parent).free


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- collectives (no-ops in one process)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _broadcast(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its result on every rank (one view of the shared file system)."""
    box = [compute() if _rank() == 0 else None]
    if _world() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def _spread(items: list[str], compute: Callable[[str], T]) -> dict[str, T]:
    """``compute(item)`` for every item, each rank taking every world-th one; every rank gets all results."""
    mine = {item: compute(item) for item in items[_rank() :: _world()]}
    if _world() == 1:
        return mine
    parts: list[dict[str, T] | None] = [None] * _world()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}  # type: ignore[union-attr]
