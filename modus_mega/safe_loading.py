"""Loading checkpoint files without running pickled code, DeepSpeed's included (DESIGN §7).

``torch.load(weights_only=True)`` rebuilds tensors and plain data (dicts, lists, numbers,
strings) and refuses any other object before building it, so a file holding an object
whose ``__reduce__`` runs a command is refused instead of executed. DeepSpeed's checkpoint
engine loads with ``weights_only=False``; ``WeightsOnlyCheckpointEngine`` wraps the engine
a ``DeepSpeedEngine`` picked (``engine.checkpoint_engine``, the one object every DeepSpeed
load goes through: model states, pipeline layer files, ZeRO optimizer partitions) and loads
through ``safe_load`` instead; saving goes to the wrapped engine, with a full disk or a
read-only directory reported by ``checkpoint_integrity.write_errors``.

DeepSpeed's files legitimately hold four objects besides tensors and plain data, found by
listing the globals in the pickles of real checkpoints at ZeRO 0-3, tp = 2 and pp = 2 (its
optimizer partitions; the GPU's BF16 optimizer state, read from its ``state_dict``, holds
the same fragment addresses): the loss scaler (``LossScaler``; ``DynamicLossScaler`` with fp16), the
ZeRO stage (``ZeroStageEnum``, an int enum) and ``fragment_address`` (a dataclass of two
ints). They are allowed by ``torch.serialization.safe_globals`` for the load only: their
constructors and ``__setstate__`` only store plain values.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from modus_mega.checkpoint_integrity import tensor_bytes, write_errors

# The objects besides tensors and plain data that DeepSpeed's checkpoint files hold.
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class UnsafeCheckpointError(ValueError):
    """A checkpoint file is unreadable without running its pickled code, or unreadable at all."""


def safe_load(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """``torch.load(path)`` building tensors, plain data and DeepSpeed's few plain objects only.

    Raises ``UnsafeCheckpointError`` naming the file and what it holds when it holds any
    other object (nothing of it is built, nothing runs), and naming the file when it is
    missing, truncated or not a torch file.
    """
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        what = unsafe.group(1) if unsafe else str(e).splitlines()[0]
        raise UnsafeCheckpointError(
            f"{path} holds {what}, which is neither tensor data nor a DeepSpeed checkpoint object; it was not "
            "loaded (loading it would run its code). The file was not written by this training code: restore it "
            "or resume from another tag"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UnsafeCheckpointError(
            f"{path} cannot be read as a checkpoint file ({str(e).splitlines()[0]}); it is missing, truncated or "
            "corrupt: resume from another tag"
        ) from None


class WeightsOnlyCheckpointEngine(CheckpointEngine):
    """DeepSpeed's checkpoint engine ``inner``, loading through ``safe_load`` and naming disk errors on save."""

    def __init__(self, inner: CheckpointEngine) -> None:
        super().__init__()
        self.inner = inner
        self.name = f"WeightsOnly({inner.name})"

    @classmethod
    def install(cls, ds_engine: Any) -> None:
        """Wrap ``ds_engine.checkpoint_engine`` (a ``DeepSpeedEngine``'s) once; later calls change nothing."""
        if not isinstance(ds_engine.checkpoint_engine, cls):
            ds_engine.checkpoint_engine = cls(ds_engine.checkpoint_engine)

    def load(self, path: str, map_location: Any = None) -> Any:
        """The file at ``path``, loaded weights-only."""
        return safe_load(path, map_location=map_location)

    def save(self, state_dict: Any, path: str) -> None:
        """The wrapped engine's save; no space or no permission raise ``CheckpointWriteError``."""
        with write_errors(Path(path), tensor_bytes(state_dict)):
            self.inner.save(state_dict, path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """The wrapped engine's ``makedirs``, with the same error reporting as ``save``."""
        with write_errors(Path(path), 0, is_directory=True):
            self.inner.makedirs(path, exist_ok=exist_ok)

    def create(self, info: CheckpointCommitInfo) -> None:
        """The wrapped engine's."""
        self.inner.create(info)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        """The wrapped engine's."""
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        """The wrapped engine's."""
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self) -> bool:
        """The wrapped engine's."""
        return self.inner.is_decoupled()

    def set_commit_info(self, info: CheckpointCommitInfo) -> None:
        """The wrapped engine's."""
        self.inner.set_commit_info(info)

    def get_commit_info(self) -> CheckpointCommitInfo | None:
        """The wrapped engine's."""
        return self.inner.get_commit_info()

    def cleanup(self) -> None:
        """The wrapped engine's."""
        self.inner.cleanup()

    def preserves_storage_sharing(self) -> bool:
        """The wrapped engine's."""
        return self.inner.preserves_storage_sharing()
