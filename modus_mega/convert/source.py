"""Checkpoints as lazy sources of named tensors, and the streaming loader into (sharded) modules.

Every checkpoint layout is read through a ``TensorSource``: tensors under their MODUS names
(``keymap.py``), each read only when asked for, so converting or loading holds one tensor
at a time. Layout-specific sources live next to their layout (``SafetensorsSource`` here
for the Hugging Face layout, ``bagel.BagelSource``, and ``deepspeed_run.DeepSpeedRunSource``
for a training run's sharded DeepSpeed checkpoint).

``LazyTensor`` is what a source hands out per tensor: anything with ``shape`` and basic
slicing (``t[a:b]``, ``t[:, a:b]``) that returns a ``torch.Tensor``. A safetensors slice
reads only the requested rows/columns from disk, so a tensor-parallel rank that slices
its own part never reads the rest; a plain tensor satisfies the protocol too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm import tqdm

from modus_mega.convert.keymap import VOCAB_TENSORS
from modus_mega.seeding import derive_seed

# safetensors dtype codes <-> torch dtypes (the codes are the format's own).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}

EXTRA_STATE_KEY = "_extra_state"  # state-dict suffix of nn.Module.get_extra_state (torch's own name)
NEW_ROW_NOISE = 0.02  # std of new vocabulary rows around the text rows' mean, in units of their per-dim std
_CHUNK_ROWS = 8192  # rows per chunk of the new-row statistics and noise (bounded memory; part of the scheme)


class LazyTensor(Protocol):
    """A tensor that may not be in memory yet: its shape, and basic slicing that reads it."""

    @property
    def shape(self) -> torch.Size: ...

    def __getitem__(self, index: Any) -> Tensor: ...


# (parameter, its full tensor, lazily) -> the part this rank holds. Same contract as
# model/init.py's ShardFn; a hook that uses basic slicing only serves both.
ShardFn = Callable[[nn.Parameter, LazyTensor], Tensor]
# parameter -> its full (unsharded) shape. Serial: the parameter's own shape.
FullShapeFn = Callable[[Tensor], torch.Size]


def full_tensor(param: Tensor, full: LazyTensor) -> Tensor:
    """The serial shard hook: the whole tensor."""
    return full[:]


def param_shape(param: Tensor) -> torch.Size:
    """The serial full-shape hook: the parameter's own shape."""
    return param.shape


class TensorSource(ABC):
    """Named tensors of one checkpoint, in MODUS names, read one at a time on demand."""

    label: str  # where the tensors come from, for messages ("/ckpt/model.safetensors.index.json")

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor name, in the checkpoint's order."""

    @abstractmethod
    def shape(self, name: str) -> torch.Size:
        """Shape of ``name`` without reading it."""

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """Dtype of ``name`` without reading it."""

    @abstractmethod
    def lazy(self, name: str) -> LazyTensor:
        """``name`` as a lazily read, sliceable tensor."""

    def read(self, name: str) -> Tensor:
        """The whole tensor ``name``."""
        return self.lazy(name)[:]

    def items(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` pairs in order, each tensor read only when reached."""
        for name in self.names():
            yield name, self.read(name)

    def describe(self, name: str) -> str:
        """``name`` and where it is (or would be) stored, for error messages."""
        return f"{name!r} in {self.label}"

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SafetensorsSlice:
    """A LazyTensor over one tensor of an open safetensors file."""

    def __init__(self, handle: Any, name: str, shape: torch.Size) -> None:
        self._handle, self._name, self.shape = handle, name, shape

    def __getitem__(self, index: Any) -> Tensor:
        return self._handle.get_slice(self._name)[index]


def open_safetensors(path: Path, stack: ExitStack) -> Any:
    """Open ``path`` lazily (header only); a truncated or corrupt file raises ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist; the checkpoint is incomplete")
    try:
        return stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: copy or export it again"
        ) from None


class SafetensorsSource(TensorSource):
    """Tensors of one or more safetensors files, under their stored names.

    ``expected`` (optional) maps each name to the file that must hold it (a sharded
    checkpoint's index): names the index lists but the files lack, or the reverse, are
    refused.
    """

    def __init__(
        self, files: Sequence[Path], label: str | None = None, expected: Mapping[str, Path] | None = None
    ) -> None:
        self.label = label or ", ".join(str(f) for f in files)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._files: dict[str, Path] = {}
        try:
            for path in files:
                handle = open_safetensors(Path(path), self._stack)
                for name in handle.keys():
                    if name in self._handles:
                        raise ValueError(f"tensor {name!r} is stored twice: in {self._files[name]} and in {path}")
                    self._handles[name] = handle
                    self._files[name] = Path(path)
            if expected is not None:
                self._check_index(expected)
        except BaseException:
            self._stack.close()
            raise

    def _check_index(self, expected: Mapping[str, Path]) -> None:
        for name, path in expected.items():
            if self._files.get(name) != Path(path):
                raise ValueError(
                    f"{self.label} maps tensor {name!r} to {Path(path).name}, but "
                    + (f"it is stored in {self._files[name].name}" if name in self._files else "no shard holds it")
                    + "; the checkpoint is inconsistent: export it again"
                )
        unlisted = [name for name in self._files if name not in expected]
        if unlisted:
            raise ValueError(
                f"{self._files[unlisted[0]]} holds tensor {unlisted[0]!r} (and {len(unlisted) - 1} more) that "
                f"{self.label} does not list; the checkpoint is inconsistent: export it again"
            )

    def names(self) -> list[str]:
        return list(self._handles)

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._handles[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handles[name].get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {self._files[name]} has dtype {code}, which MODUS does not read")
        return SAFETENSORS_DTYPES[code]

    def lazy(self, name: str) -> LazyTensor:
        return _SafetensorsSlice(self._handles[name], name, self.shape(name))

    def read(self, name: str) -> Tensor:
        return self._handles[name].get_tensor(name)

    def describe(self, name: str) -> str:
        return f"{name!r} in {self._files[name] if name in self._files else self.label}"

    def close(self) -> None:
        self._stack.close()


def is_extra_state(name: str) -> bool:
    """True for a layer's ``get_extra_state`` entry (Megatron's and TE's linears): metadata, not a weight."""
    return name.rsplit(".", 1)[-1] == EXTRA_STATE_KEY


def state_tensors(modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Parameters and persistent buffers of ``modules`` (prefix -> module) by full name.

    A tensor shared under two names (tied embeddings) is listed once, under its first name.
    Layers' extra state (``is_extra_state``) is not a tensor of the checkpoint formats here.
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for prefix, module in modules.items():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not is_extra_state(name) and id(tensor) not in seen:
                seen.add(id(tensor))
                tensors[prefix + name] = tensor
    return tensors


class ModuleSource(TensorSource):
    """The tensors of in-memory modules (prefix -> module), e.g. a model to export."""

    def __init__(self, modules: Mapping[str, nn.Module], label: str = "the in-memory model") -> None:
        self.label = label
        self._tensors = state_tensors(modules)

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> torch.Size:
        return self._tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def lazy(self, name: str) -> LazyTensor:
        return self._tensors[name].detach()


class FilteredSource(TensorSource):
    """The tensors of ``base`` whose names ``keep`` accepts."""

    def __init__(self, base: TensorSource, keep: Callable[[str], bool]) -> None:
        self.base, self.label = base, base.label
        self._names = [name for name in base.names() if keep(name)]
        self._set = set(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def shape(self, name: str) -> torch.Size:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def lazy(self, name: str) -> LazyTensor:
        return self.base.lazy(name)

    def read(self, name: str) -> Tensor:
        return self.base.read(name)

    def describe(self, name: str) -> str:
        return self.base.describe(name)

    def close(self) -> None:
        self.base.close()


# ----------------------------------------------------------------------------- vocabulary rows


@torch.no_grad()
def extend_vocab_rows(text: Tensor, rows: int, seed: int, name: str, noise: float = NEW_ROW_NOISE) -> Tensor:
    """``text`` [V_text, D] followed by ``rows - V_text`` new rows: [rows, D], in ``text``'s dtype.

    The new-row scheme (for the embedding and the LM head alike): each new row is the mean
    of the text rows plus Gaussian noise of ``noise`` times their per-dimension std,
    ``new = mean + noise * std * z``, z ~ N(0, 1) in float64, drawn in chunks of 8192 rows
    from a generator seeded by ``derive_seed(seed, name)`` (as weight init), so every rank
    and every parallel layout draws the same rows. The mean keeps a new token's logit at
    the average logit (it neither dominates nor vanishes from the softmax, Hewitt 2021); the
    noise makes new tokens distinct. Text rows are copied bit for bit. Statistics and noise
    are computed over row chunks, so memory stays near one copy of the output.
    """
    num_text, dim = text.shape
    if rows <= num_text:
        raise ValueError(f"cannot extend {name!r} from {num_text} to {rows} rows; the target must be larger")
    total = torch.zeros(dim, dtype=torch.float64)
    total_sq = torch.zeros(dim, dtype=torch.float64)
    for chunk in text.split(_CHUNK_ROWS):
        chunk64 = chunk.double()
        total += chunk64.sum(0)
        total_sq += chunk64.square().sum(0)
    mean = total / num_text
    std = (total_sq / num_text - mean.square()).clamp_min(0).sqrt()
    generator = torch.Generator().manual_seed(derive_seed(seed, name))
    out = text.new_empty(rows, dim)
    out[:num_text] = text
    for start in range(num_text, rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, rows)
        z = torch.randn(stop - start, dim, generator=generator, dtype=torch.float64)
        out[start:stop] = (mean + noise * std * z).to(text.dtype)
    return out


class VocabRowsSource(TensorSource):
    """``base`` with its vocabulary tensors (``keymap.VOCAB_TENSORS``) at ``rows`` rows.

    A stored vocabulary tensor with ``rows`` rows passes through; one with exactly
    ``text_rows`` rows (a BAGEL checkpoint: the pretrained vocabulary only) is extended by
    ``extend_vocab_rows``; when ``rows == text_rows`` a larger stored tensor is cut to its
    text rows (BAGEL's row count on export). Any other row count is refused.
    """

    def __init__(
        self, base: TensorSource, rows: int, text_rows: int, seed: int = 0, noise: float = NEW_ROW_NOISE
    ) -> None:
        self.base, self.label = base, base.label
        self.rows, self.text_rows, self.seed, self.noise = rows, text_rows, seed, noise
        for name in VOCAB_TENSORS:
            if name in base:
                self._check(name, base.shape(name))

    def _check(self, name: str, stored: torch.Size) -> None:
        cut = self.rows == self.text_rows and stored[0] > self.rows  # export of the text rows only
        if len(stored) != 2 or not (stored[0] in (self.rows, self.text_rows) or cut):
            raise ValueError(
                f"vocabulary tensor {self.base.describe(name)} has shape {list(stored)}; expected "
                f"[{self.text_rows}, D] (the pretrained text vocabulary, model.vocab.text_vocab_size) or "
                f"[{self.rows}, D] (the whole extended vocabulary): check model.vocab in the config"
            )

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def shape(self, name: str) -> torch.Size:
        stored = self.base.shape(name)
        return torch.Size([self.rows, *stored[1:]]) if name in VOCAB_TENSORS else stored

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def lazy(self, name: str) -> LazyTensor:
        if name not in VOCAB_TENSORS:
            return self.base.lazy(name)
        stored = self.base.shape(name)[0]
        if stored == self.rows:
            return self.base.lazy(name)
        if stored > self.rows:
            return self.base.lazy(name)[: self.rows]
        return extend_vocab_rows(self.base.read(name), self.rows, self.seed, name, self.noise)

    def describe(self, name: str) -> str:
        return self.base.describe(name)

    def close(self) -> None:
        self.base.close()


# ----------------------------------------------------------------------------- checking and loading


def _listing(names: Sequence[str], describe: Callable[[str], str], limit: int = 8) -> str:
    shown = "; ".join(describe(n) for n in names[:limit])
    return shown + (f"; and {len(names) - limit} more" if len(names) > limit else "")


def check_floating(source: TensorSource, names: Sequence[str], cast_to: torch.dtype | None) -> None:
    """Refuse non-floating tensors among ``names`` unless ``cast_to`` (an explicit ``--dtype``) converts them.

    Every tensor of a MODUS model is floating point, so an integer or boolean tensor in a
    checkpoint would change dtype on the way in: a damaged or foreign file, never done silently.
    """
    wrong = [name for name in names if not source.dtype(name).is_floating_point]
    if wrong and cast_to is None:
        listing = _listing(wrong, lambda n: f"{source.describe(n)} ({source.dtype(n)})")
        raise ValueError(
            f"refusing checkpoint {source.label}: {len(wrong)} tensor(s) are not floating point, but the model's "
            f"are: {listing}. Converting would change their dtype; the file is damaged or not a MODUS/BAGEL "
            "checkpoint. Pass --dtype (e.g. --dtype float32) to cast them explicitly."
        )


def check_finite(tensor: Tensor, what: str, fix: str) -> Tensor:
    """``tensor`` unchanged if every value is finite; else a ValueError naming ``what``, the count and ``fix``."""
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"refusing {what}: it holds {bad} non-finite value(s) (NaN/Inf) of {tensor.numel()}; "
                             + fix)  # fmt: skip
    return tensor


def check_tensors(expected: Mapping[str, torch.Size], source: TensorSource, allow_unused: bool = False) -> None:
    """Refuse ``source`` unless it holds exactly the ``expected`` names with the expected shapes.

    Raises ValueError naming every missing tensor, every tensor the model does not have
    (unless ``allow_unused``) and every shape mismatch with both shapes.
    """
    problems = []
    missing = [name for name in expected if name not in source]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_listing(missing, source.describe)}")
    if not allow_unused:
        extra = [name for name in source.names() if name not in expected]
        if extra:
            listing = _listing(extra, source.describe)
            problems.append(f"{len(extra)} tensor(s) in the checkpoint that the model does not have: {listing}")

    def both_shapes(name: str) -> str:
        return f"{source.describe(name)}: checkpoint {list(source.shape(name))}, model {list(expected[name])}"

    mismatched = [name for name in expected if name in source and source.shape(name) != expected[name]]
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape: {_listing(mismatched, both_shapes)}")
    if problems:
        raise ValueError(
            f"refusing checkpoint {source.label}: " + " | ".join(problems) + ". The checkpoint and the model config "
            "disagree: use the config the checkpoint was written with, or convert the checkpoint for this config."
        )


@torch.no_grad()
def load_into(
    modules: Mapping[str, nn.Module],
    source: TensorSource,
    shard: ShardFn = full_tensor,
    full_shape: FullShapeFn = param_shape,
    allow_unused: bool = False,
    progress: bool = False,
) -> None:
    """Copy ``source`` into ``modules`` (name prefix -> module), one tensor at a time.

    Every parameter and persistent buffer must be present with its full shape
    (``full_shape``); ``shard(param, lazy_full)`` cuts the local part (serial: all of it),
    reading only that part when the source can. Tensors of the checkpoint that no module
    holds are refused unless ``allow_unused`` (a pipeline stage loading its own layers).
    Values are cast to each parameter's dtype (floating to floating only: ``check_floating``).
    Nothing is copied unless every name and shape checks out; a tensor holding NaN or Inf
    is refused (``check_finite``).
    """
    targets = state_tensors(modules)
    check_tensors({name: full_shape(t) for name, t in targets.items()}, source, allow_unused)
    check_floating(source, list(targets), cast_to=None)
    bar = tqdm(targets.items(), desc=f"load {source.label}", unit="tensor", disable=not progress)
    for name, target in bar:
        local = shard(target, source.lazy(name))
        if local.shape != target.shape:
            raise ValueError(
                f"the shard hook cut {list(local.shape)} out of {source.describe(name)} for a local tensor of "
                f"shape {list(target.shape)}; fix the shard / full_shape hooks"
            )
        target.copy_(check_finite(local, source.describe(name), "the checkpoint is damaged: use an intact copy"))

