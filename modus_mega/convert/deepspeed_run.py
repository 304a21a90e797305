"""A training run's checkpoint as a ``TensorSource``: any tp degree and ZeRO stage 0-3.

What is read (``training/checkpoint.py`` writes the run's part, DeepSpeed names its files;
``m = s * tp + t`` is DeepSpeed's model-parallel rank of pipeline stage s, tp rank t)::

    RUN_DIR/checkpoints/latest                                    the tag of the last complete save (the default)
    <tag>/trainer_state.json                                      the step and the resolved config
    <tag>/mp_rank_{m:02d}_model_states.pt                         ZeRO 0-2: the module's tensors (pp = 1),
                                                                  parameter shapes, ZeRO 0's optimizer state
    <tag>/layer_{s:02d}-model_{t:02d}-model_states.pt             pp > 1: stage s's tensors (global names)
    <tag>/zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt        ZeRO 3: shapes, frozen fragments of dp rank d
    <tag>/[bf16_]zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt ZeRO 1-3: (d, m)'s fp32 partition

Which copy of a weight is read: DeepSpeed's fp32 master copy where the checkpoint keeps one
(ZeRO 1-3, the optimizer's flat partitions, put back together as DeepSpeed's own
``zero_to_fp32.py`` does), else the module's tensor (ZeRO 0; frozen parameters and buffers
at ZeRO 1-2). ZeRO 1-2: each trainable group is one flat vector (parameters in
``param_shapes`` order, each followed by its alignment padding) cut into dp equal
consecutive partitions. ZeRO 3: every parameter is cut into dp pieces of ceil(numel / dp)
elements; dp rank d stores its piece of each parameter, in order, in its flat groups (the
frozen ones in ``frozen_param_fragments``). The stages' tensors are disjoint (a stage's
parameters carry the model's global names; DeepSpeed's ``<stage>.`` prefix in the
optimizer's metadata is dropped). Tensor-parallel pieces are then concatenated along the
dimension where the local shape is 1/tp of the model config's full shape (replicated
tensors are taken from tp rank 0).

Streaming: every file is opened with ``torch.load(weights_only=True, mmap=True)``, so a
tensor's bytes are read only when it is asked for; one read holds its tp pieces and the
merged tensor (about twice the largest tensor). ZeRO's flat partitions cost nothing more:
a parameter is sliced out of the mapped partitions directly. Nothing in the files is
unpickled beyond tensors and plain containers; the few DeepSpeed objects its optimizer
files carry (loss scaler, fragment maps, the stage enum) are read as inert stand-ins.

EMA weights (``ema=True``, runs with ``training.ema_decay > 0``): each rank's extras file
(``<tag>/extras/rank_{r:05d}.pt``) holds the fp32 EMA of the part of each trainable
parameter its optimizer owns (``parallel/ema.py``); a tp rank's pieces are joined over its
dp ranks one parameter at a time (``ema.assemble_ema``). Frozen parameters and buffers,
which no EMA averages, are the checkpoint's own.

Adam moments (``adam_state="exp_avg"`` or ``"exp_avg_sq"``, for ``convert/universal.py``):
the optimizer's moment of every trainable parameter (frozen ones have none and are left
out). At ZeRO 1-3 each moment is a flat vector laid out exactly like the fp32 partition it
belongs to (torch's AdamW state of DeepSpeed's flat parameters), so it is read with the
same offsets; at ZeRO 0 torch's per-parameter state in the model-states file is matched to
the names ``training/checkpoint.py`` records there (``OPTIMIZER_PARAM_NAMES``). Before the
optimizer's first step its state is empty, which AdamW treats as zero moments at step 0,
and so does this source. ``optimizer_step`` is AdamW's step count (one for all parameters:
every rank steps every group together). ZeRO 0 in bf16 (GPU) keeps its fp32 master weights
and moments in DeepSpeed's BF16 optimizer files, which this source does not read (its
weights there are the module's bf16 copy); asking for its moments is refused.

The VAE is frozen and not part of the DeepSpeed checkpoint: it is the release's
``ae.safetensors`` when the run started from ``init.bagel_dir``; a run started from the
seeded init exports no VAE.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modus_mega.checkpoint_layout import (
    LATEST,
    OPTIMIZER_PARAM_NAMES,
    TRAINER_STATE,
    extras_file,
    latest_tag,
    run_checkpoints,
)
from modus_mega.config import ModusConfig, config_from_dict
from modus_mega.convert.bagel import AE_FILE
from modus_mega.convert.files import read_json
from modus_mega.convert.hf import expected_shapes
from modus_mega.convert.keymap import VAE_PREFIX, is_vae_name
from modus_mega.convert.source import LazyTensor, SafetensorsSource, TensorSource, is_extra_state
from modus_mega.parallel.ema import assemble_ema
from modus_mega.parallel.pipeline import global_parameter_name

ADAM_STATES = ("exp_avg", "exp_avg_sq")  # torch AdamW's moments: what ``adam_state`` may name

# Per ZeRO stage, the optimizer file's entries: the fp32 partitions (one flat tensor per group)
# and the torch optimizer state of those flat tensors, which holds the Adam moments.
_ZERO_FLATS = {
    1: ("single_partition_of_fp32_groups", "base_optimizer_state"),
    2: ("single_partition_of_fp32_groups", "base_optimizer_state"),
    3: ("fp32_flat_groups", "optimizer_state_dict"),
}


class _Inert:
    """Stand-in for a DeepSpeed object in an optimizer file that export never uses; keeps nothing."""

    def __init__(self, *args: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


# DeepSpeed globals found in its optimizer files -> what the weights-only unpickler builds instead.
_DEEPSPEED_STAND_INS: list[tuple[Any, str]] = [
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_Inert, "deepspeed.utils.tensor_fragment.fragment_address"),
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),  # an IntEnum: its value
]


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a training run directory (it holds ``checkpoints/``)."""
    return run_checkpoints(path).is_dir()


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """One ``torch.save`` file of a training checkpoint, memory-mapped, unpickling nothing but tensors and plain data.

    Raises ValueError naming the file when it is missing, truncated, corrupt, or holds any
    other object (the weights-only unpickler refuses it before it is built).
    """
    if not path.is_file():
        raise ValueError(f"{path} is missing; the checkpoint is incomplete (a rank did not save): use an earlier tag")
    try:
        with torch.serialization.safe_globals(_DEEPSPEED_STAND_INS):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        reason = f"it holds {unsafe.group(1)}, which is not tensor data" if unsafe else str(e).splitlines()[0]
        raise ValueError(
            f"{path} cannot be read as a checkpoint file without running its pickled code ({reason}); "
            "it is truncated, corrupt or not written by this training code: use an earlier tag"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint's state dict")
    return data


def _field(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ValueError(f"{path} lacks DeepSpeed's {key!r} entry; it is not a DeepSpeed checkpoint of this version")
    return data[key]


class _FlatView:
    """Consecutive flat tensors (memory-mapped partitions) read as one vector."""

    def __init__(self, parts: Sequence[Tensor], label: str) -> None:
        self.parts, self.label = list(parts), label
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.numel())
        self.numel = self.starts[-1]
        self.dtype = self.parts[0].dtype if self.parts else torch.float32

    def read(self, start: int, stop: int) -> Tensor:
        """Elements ``[start, stop)`` as a new tensor; only their bytes are read."""
        if stop > self.numel:
            raise ValueError(f"{self.label} holds {self.numel} elements, fewer than the {stop} its metadata needs")
        pieces = [
            part[max(start, begin) - begin : min(stop, begin + part.numel()) - begin]
            for part, begin in zip(self.parts, self.starts)
            if max(start, begin) < min(stop, begin + part.numel())
        ]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=self.dtype)


@dataclass(frozen=True)
class _Local:
    """One tp rank's tensor of one name: its (tp-local) shape and dtype, read on demand."""

    shape: torch.Size
    dtype: torch.dtype
    read: Callable[[], Tensor]


def _whole(tensor: Tensor) -> _Local:
    return _Local(tensor.shape, tensor.dtype, lambda: tensor.clone())


def _zeros(shape: torch.Size) -> _Local:
    return _Local(shape, torch.float32, lambda: torch.zeros(shape))


def _zero12_piece(view: _FlatView, start: int, shape: torch.Size) -> _Local:
    return _Local(shape, view.dtype, lambda: view.read(start, start + shape.numel()).view(shape))


def _zero3_piece(views: Sequence[_FlatView], start: int, shape: torch.Size) -> _Local:
    part = math.ceil(shape.numel() / len(views))

    def read() -> Tensor:
        return torch.cat([view.read(start, start + part) for view in views])[: shape.numel()].view(shape)

    return _Local(shape, views[0].dtype, read)


def _zero3_frozen(fragments: Sequence[Tensor], shape: torch.Size) -> _Local:
    return _Local(shape, fragments[0].dtype, lambda: torch.cat(list(fragments))[: shape.numel()].view(shape))


def _zero3_frozen_tensors(states: Sequence[dict[str, Any]]) -> dict[str, _Local]:
    """ZeRO 3's frozen parameters, from every dp rank's fragments (``states``: the dp ranks' model states)."""
    return {
        name: _zero3_frozen([state["frozen_param_fragments"][name] for state in states], torch.Size(shape))
        for name, shape in (states[0].get("frozen_param_shapes") or {}).items()
    }


def _ema_piece(states: Sequence[dict[str, Any]], name: str, shape: torch.Size) -> _Local:
    """``name``'s EMA [shape] (fp32), joined from the dp ranks' pieces when read."""
    keys = ("tensors", "starts", "numels", "shapes")
    owners = [{key: {name: state[key][name]} for key in keys} for state in states if name in state["tensors"]]
    return _Local(shape, torch.float32, lambda: assemble_ema(owners)[name])


class _Deferred:
    """A LazyTensor that reads its whole tensor when sliced."""

    def __init__(self, shape: torch.Size, read: Callable[[], Tensor]) -> None:
        self.shape, self._read = shape, read

    def __getitem__(self, index: Any) -> Tensor:
        return self._read()[index]


class DeepSpeedRunSource(TensorSource):
    """The model tensors of a checkpoint of ``run_dir`` under MODUS names, full shapes, read lazily.

    The checkpoint is the tag ``tag``, by default the one ``latest`` names. ``config`` is
    the run's resolved config (from the checkpoint's ``trainer_state.json``) and ``step``
    its training step. With ``ema`` the trainable parameters are the run's EMA weights
    instead (refused when the run keeps none); with ``adam_state`` (one of ``ADAM_STATES``)
    the source holds that Adam moment of each trainable parameter and nothing else, and
    ``optimizer_step`` is AdamW's step count (None otherwise). With ``with_vae`` the VAE's
    tensors are included when the run started from a BAGEL release (``has_vae``). Every
    inconsistency (a missing rank file, metadata that does not match the partitions, tp
    pieces that do not fit the model config) is a ValueError naming the file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        ema: bool = False,
        with_vae: bool = True,
        tag: str | None = None,
        adam_state: str | None = None,
    ) -> None:
        run_dir = Path(run_dir)
        root = run_checkpoints(run_dir)
        named_by = f"{root / LATEST} names" if tag is None else "asked for"
        tag = tag or latest_tag(root)
        if tag is None:
            raise ValueError(
                f"{run_dir} holds no completed training checkpoint: {root / LATEST} is missing (the run never "
                "finished a save); train until a checkpoint is written, or pass a Hugging Face checkpoint directory"
            )
        self.tag_dir = root / tag
        if not self.tag_dir.is_dir():
            raise ValueError(f"{named_by} tag {tag!r}, but {self.tag_dir} does not exist; point it at a complete "
                             "tag or restore that directory")  # fmt: skip
        if adam_state is not None and (adam_state not in ADAM_STATES or ema):
            raise ValueError(f"adam_state={adam_state!r} with ema={ema}: read one of {ADAM_STATES}, or weights")
        self.label = str(self.tag_dir)
        state_path = self.tag_dir / TRAINER_STATE
        record = read_json(state_path, "the trainer state (step and resolved config)")
        if not isinstance(record.get("config"), dict):
            raise ValueError(f"{state_path} lacks the run's config; the checkpoint is incomplete: use an earlier tag")
        self.config: ModusConfig = config_from_dict(record["config"], source=str(state_path))
        self.step = int(record.get("step", 0))
        parallel = self.config.parallel
        self.tp, self.pp, self.zero_stage = parallel.tp, parallel.pp, parallel.zero_stage
        if ema and self.config.training.ema_decay <= 0:
            raise ValueError(
                f"{self.tag_dir} holds no EMA weights: its run trained with training.ema_decay = "
                f"{self.config.training.ema_decay} (see {state_path}); export without --ema"
            )
        self.ema, self.adam_state = ema, adam_state
        self._steps: set[int] = set()  # AdamW step counts seen (adam_state sources)
        self._ranks = [self._open_tp_rank(t) for t in range(self.tp)]  # each: name -> this tp rank's piece
        self._names, self._split_dims = self._merge_plan()
        self.optimizer_step: int | None = None
        if adam_state is not None:
            if len(self._steps) != 1:
                raise ValueError(f"the optimizer states of {self.tag_dir} hold different step counts "
                                 f"({sorted(self._steps)}); the tag mixes two runs: use an earlier tag")  # fmt: skip
            (self.optimizer_step,) = self._steps
        self._vae: SafetensorsSource | None = None
        if with_vae and self.config.init.bagel_dir and adam_state is None:
            self._vae = SafetensorsSource([Path(self.config.init.bagel_dir) / AE_FILE])
            self._names += [VAE_PREFIX + name for name in self._vae.names()]
        self._name_set = set(self._names)

    # ------------------------------------------------------------------ reading one model-parallel rank

    def _open_tp_rank(self, t: int) -> dict[str, _Local]:
        """tp rank ``t``'s tensors (tp-local shapes) by name: every stage's, in stage order."""
        local: dict[str, _Local] = {}
        for s in range(self.pp):
            stage = self._open_stage(s, t)
            twice = sorted(set(stage) & set(local))
            if twice:
                raise ValueError(f"pipeline stage {s} of {self.tag_dir} holds {twice[0]!r}, which an earlier stage "
                                 "holds too; the stage files do not belong together: use an earlier tag")  # fmt: skip
            local.update(stage)
        return local

    def _open_stage(self, s: int, t: int) -> dict[str, _Local]:
        """Pipeline stage ``s``'s tensors on tp rank ``t`` (tp-local shapes) by name, in the module's order."""
        m = s * self.tp + t  # DeepSpeed's model-parallel rank: stage-major, then tp
        if self.zero_stage == 3:
            first = self.tag_dir / f"zero_pp_rank_0_mp_rank_{m:02d}_model_states.pt"
        else:
            first = self.tag_dir / f"mp_rank_{m:02d}_model_states.pt"
        main = load_checkpoint_file(first)
        stage = _field(main, "ds_config", first).get("zero_optimization", {}).get("stage", 0)
        mp, dp = _field(main, "mp_world_size", first), _field(main, "dp_world_size", first)
        if (stage, mp) != (self.zero_stage, self.tp * self.pp):
            raise ValueError(
                f"{first} was saved at ZeRO {stage} with {mp} model-parallel ranks, but {self.tag_dir / TRAINER_STATE} "
                f"says ZeRO {self.zero_stage}, tp={self.tp} x pp={self.pp}; the tag mixes two runs: use an earlier tag"
            )
        if self.pp > 1:  # the stage module's own state dict (DeepSpeed's per-layer file; one layer per stage)
            module = load_checkpoint_file(self.tag_dir / f"layer_{s:02d}-model_{t:02d}-model_states.pt")
        else:
            module = _field(main, "module", first)
        rename = global_parameter_name if self.pp > 1 else str  # the optimizer's names carry "<stage>." at pp > 1
        local: dict[str, _Local] = {}
        if self.zero_stage < 3:  # the module holds every tensor in full (bf16 on GPU)
            local.update({name: _whole(tensor) for name, tensor in module.items() if isinstance(tensor, Tensor)})
        optims = [self._optimizer_state(d, m, main) for d in range(dp)] if self.zero_stage > 0 else []
        if self.zero_stage == 3:  # trainable parameters: the fp32 master copy of the partitions
            states = [main] + [
                load_checkpoint_file(self.tag_dir / f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt")
                for d in range(1, dp)
            ]
            local.update(self._zero3_tensors(main, self._master_partitions(optims), first))
            local.update(_zero3_frozen_tensors(states))
            local.update({name: _whole(module[name]) for name in _field(main, "buffer_names", first)})
        elif self.zero_stage > 0:
            local.update(self._zero12_tensors(main, optims[0][1], self._master_partitions(optims), first, rename))
        if self.ema:
            local.update(self._ema_tensors(s, t, dp, local, rename))
        aliases = set(main.get("shared_params") or {})  # tied parameters: kept under their first name
        unknown = [n for n, v in module.items() if not is_extra_state(n) and n not in local and n not in aliases]
        if unknown:
            raise ValueError(
                f"{first}: module tensor {unknown[0]!r} is in no partition of the checkpoint's metadata (and "
                f"{len(unknown) - 1} more); the checkpoint is inconsistent: use an earlier tag"
            )
        if self.adam_state is not None:  # the trainable parameters' moments replace the weights
            local = self._adam_tensors(main, optims, first, rename, local)
        order = [name for name in module if name in local and name not in aliases and not is_extra_state(name)]
        return {name: local[name] for name in _drop_tied(order, module)}

    def _optimizer_state(self, d: int, m: int, main: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """The optimizer state of dp rank ``d``, model-parallel rank ``m`` (ZeRO 1-3) and its file."""
        prefix = "bf16_" if main["ds_config"].get("bf16", {}).get("enabled") else ""
        path = self.tag_dir / f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt"
        state = _field(load_checkpoint_file(path), "optimizer_state_dict", path)
        if state.get("zero_stage", self.zero_stage) != self.zero_stage:
            raise ValueError(f"{path} was saved at ZeRO {state['zero_stage']}, the rest of {self.tag_dir} at ZeRO "
                             f"{self.zero_stage}; the tag mixes two runs: use an earlier tag")  # fmt: skip
        return path, state

    def _master_partitions(self, optims: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, list[Tensor]]]:
        """Per dp rank (ZeRO 1-3): its optimizer file and its fp32 partition, one flat tensor per group."""
        flats_key, _ = _ZERO_FLATS[self.zero_stage]
        return [(path, _field(state, flats_key, path)) for path, state in optims]

    def _moment_partitions(
        self, optims: list[tuple[Path, dict[str, Any]]], moment: str
    ) -> list[tuple[Path, list[Tensor]]] | None:
        """``_master_partitions``' layout for the Adam ``moment``; None before the optimizer's first step."""
        _, optimizer_key = _ZERO_FLATS[self.zero_stage]
        adams = [self._adam_states(_field(state, optimizer_key, path), path) for path, state in optims]
        if all(adam is None for adam in adams):
            return None
        partitions = []
        for (path, flats), adam in zip(self._master_partitions(optims), adams):
            if adam is None or len(adam) != len(flats):
                raise ValueError(
                    f"{path} holds Adam moments for {len(adam or [])} of its {len(flats)} flat groups, unlike the "
                    "other dp ranks' files; the tag is inconsistent: use an earlier tag"
                )
            partitions.append((path, [param_state[moment] for param_state in adam]))
        return partitions

    def _adam_states(self, optimizer: dict[str, Any], path: Path) -> list[dict[str, Any]] | None:
        """A torch optimizer state dict's per-parameter states in parameter order; None before its first step.

        Records the step counts found (``optimizer_step``).
        """
        state = _field(optimizer, "state", path)
        if not state:
            self._steps.add(0)
            return None
        order = [i for group in _field(optimizer, "param_groups", path) for i in group["params"]]
        if sorted(state) != sorted(order):
            raise ValueError(f"{path}: the optimizer holds state for {len(state)} of its {len(order)} parameters; "
                             "the checkpoint is inconsistent: use an earlier tag")  # fmt: skip
        self._steps.update(int(state[i]["step"]) for i in order)
        return [state[i] for i in order]

    def _adam_tensors(
        self,
        main: dict[str, Any],
        optims: list[tuple[Path, dict[str, Any]]],
        first: Path,
        rename: Callable[[str], str],
        weights: dict[str, _Local],
    ) -> dict[str, _Local]:
        """Moment ``adam_state`` of the stage's trainable parameters by name; zeros before the first step."""
        if self.zero_stage == 0:
            return self._zero0_adam_tensors(main, first, weights)
        partitions = self._moment_partitions(optims, self.adam_state)
        if partitions is None:
            trainable = [rename(name) for shapes in _field(main, "param_shapes", first) for name in shapes]
            return {name: _zeros(weights[name].shape) for name in trainable}
        if self.zero_stage == 3:
            return self._zero3_tensors(main, partitions, first)
        return self._zero12_tensors(main, optims[0][1], partitions, first, rename)

    def _zero0_adam_tensors(self, main: dict[str, Any], first: Path, weights: dict[str, _Local]) -> dict[str, _Local]:
        """ZeRO 0: torch's per-parameter AdamW state, named by the checkpoint's record of the optimizer's parameters."""
        optimizer = main.get("optimizer")
        if not isinstance(optimizer, dict) or "state" not in optimizer:
            raise ValueError(
                f"{first} holds no torch optimizer state ({sorted(optimizer or {})[:4]}): a ZeRO 0 run in bf16 keeps "
                "its fp32 weights and Adam moments in DeepSpeed's BF16 optimizer files, which are not read here; "
                "train with parallel.zero_stage=1 to convert its checkpoints"
            )
        names = main.get(OPTIMIZER_PARAM_NAMES)
        if names is None:
            raise ValueError(
                f"{first} does not record which parameter each ZeRO 0 optimizer state belongs to (the checkpoint "
                "predates that record); resume the run at its saved layout, save a new checkpoint, and convert that"
            )
        missing = [name for name in names if name not in weights]
        if missing:
            raise ValueError(f"{first} names optimizer parameter {missing[0]!r}, which its module does not hold; "
                             "the checkpoint is inconsistent: use an earlier tag")  # fmt: skip
        states = self._adam_states(optimizer, first)
        if states is None:
            return {name: _zeros(weights[name].shape) for name in names}
        if len(states) != len(names):
            raise ValueError(f"{first} holds optimizer state for {len(states)} parameters but names {len(names)}; "
                             "the checkpoint is inconsistent: use an earlier tag")  # fmt: skip
        moments: dict[str, _Local] = {}
        for name, param_state in zip(names, states):
            moment = param_state[self.adam_state]
            if moment.shape != weights[name].shape:
                raise ValueError(
                    f"{first}: the {self.adam_state} of {name!r} is {list(moment.shape)}, the parameter "
                    f"{list(weights[name].shape)}; the checkpoint is inconsistent: use an earlier tag"
                )
            moments[name] = _whole(moment)
        return moments

    def _zero12_tensors(
        self,
        main: dict[str, Any],
        optim_state: dict[str, Any],
        partitions: list[tuple[Path, list[Tensor]]],
        first: Path,
        rename: Callable[[str], str],
    ) -> dict[str, _Local]:
        """Trainable parameters from the flat ``partitions`` (ZeRO 1-2), under ``rename``d names.

        ``optim_state`` (dp rank 0's optimizer state) gives the alignment padding after each parameter.
        """
        dp = len(partitions)
        local: dict[str, _Local] = {}
        groups = _field(main, "param_shapes", first)
        paddings = optim_state.get("param_alignment_paddings") or [[0] * len(shapes) for shapes in groups]
        for g, shapes in enumerate(groups):
            view = _FlatView(
                [flats[g] for _, flats in partitions],
                f"parameter group {g} of {', '.join(path.name for path, _ in partitions)}",
            )
            offset = 0
            for (name, shape), pad in zip(shapes.items(), paddings[g]):
                local[rename(name)] = _zero12_piece(view, offset, torch.Size(shape))
                offset += torch.Size(shape).numel() + pad
            align = 2 * dp  # each group's flat vector is padded to a multiple of 2 * dp (zero_to_fp32.py's check)
            if math.ceil(offset / align) != math.ceil(view.numel / align):
                raise ValueError(
                    f"{view.label}: the parameters of {first.name} fill {offset} elements, the partitions hold "
                    f"{view.numel}; the optimizer files do not belong to these model states: use an earlier tag"
                )
        return local

    def _zero3_tensors(
        self, main: dict[str, Any], partitions: list[tuple[Path, list[Tensor]]], first: Path
    ) -> dict[str, _Local]:
        """Trainable parameters from every dp rank's flat groups (ZeRO 3)."""
        views = [_FlatView(flats, str(path)) for path, flats in partitions]
        if len({view.numel for view in views}) != 1:
            raise ValueError(
                f"the ZeRO-3 partitions of {self.tag_dir} differ in size across dp ranks "
                f"({[view.numel for view in views]} elements); the tag is inconsistent: use an earlier tag"
            )
        local: dict[str, _Local] = {}
        offset = 0
        for shapes in _field(main, "param_shapes", first):
            for name, shape in shapes.items():
                local[name] = _zero3_piece(views, offset, torch.Size(shape))
                offset += math.ceil(torch.Size(shape).numel() / len(views))
        if offset != views[0].numel:
            raise ValueError(
                f"the parameters of {first.name} fill {offset} elements per dp rank, but {views[0].label} holds "
                f"{views[0].numel}; the optimizer files do not belong to these model states: use an earlier tag"
            )
        return local

    def _ema_tensors(
        self, s: int, t: int, dp: int, local: dict[str, _Local], rename: Callable[[str], str]
    ) -> dict[str, _Local]:
        """Stage ``s``, tp rank ``t``'s EMA of every trainable parameter, from its dp ranks' extras files."""
        states = []
        for d in range(dp):
            rank = (s * dp + d) * self.tp + t  # ParallelContext's rank order: tp fastest, then dp, then pp
            path = extras_file(self.tag_dir, rank)
            extras = load_checkpoint_file(path)
            if "ema" not in extras:
                raise ValueError(f"{path} holds no EMA weights although the run's config enables them; the "
                                 "checkpoint is incomplete: use an earlier tag, or export without --ema")  # fmt: skip
            states.append(extras["ema"])
        ema: dict[str, _Local] = {}
        for stored in dict.fromkeys(name for state in states for name in state["tensors"]):
            name = rename(stored)
            shape = torch.Size(next(state["shapes"][stored] for state in states if stored in state["shapes"]))
            if name not in local or local[name].shape != shape:
                raise ValueError(
                    f"the EMA of {name!r} in {self.tag_dir / 'extras'} has shape {list(shape)}, but the model "
                    f"states hold {list(local[name].shape) if name in local else 'no such tensor'}; the checkpoint "
                    "is inconsistent: use an earlier tag"
                )
            ema[name] = _ema_piece(states, stored, shape)
        return ema

    # ------------------------------------------------------------------ merging tp ranks

    def _merge_plan(self) -> tuple[list[str], dict[str, int | None]]:
        """The names (tp rank 0's order) and, per name, the dimension its tp pieces are concatenated along."""
        names = list(self._ranks[0])
        for t, rank in enumerate(self._ranks[1:], start=1):
            if list(rank) != names:
                odd = sorted(set(rank) ^ set(names))
                raise ValueError(f"tp rank {t} of {self.tag_dir} holds other tensors than tp rank 0 ({odd[:4]}); "
                                 "the tag mixes two runs: use an earlier tag")  # fmt: skip
        full = expected_shapes(self.config.model, with_vae=False)
        split: dict[str, int | None] = {}
        for name in names:
            shapes = {rank[name].shape for rank in self._ranks}
            if len(shapes) != 1:
                raise ValueError(
                    f"{name!r} has different shapes on the tp ranks of {self.tag_dir}: {sorted(map(list, shapes))}; "
                    "the tag mixes two runs: use an earlier tag"
                )
            (local,) = shapes
            target = full.get(name, local)
            dims = [i for i, (a, b) in enumerate(zip(local, target)) if a != b]
            if local == target or self.tp == 1:
                split[name] = None
            elif len(local) == len(target) and len(dims) == 1 and local[dims[0]] * self.tp == target[dims[0]]:
                split[name] = dims[0]
            else:
                raise ValueError(
                    f"{name!r} is {list(local)} on each of the {self.tp} tp ranks of {self.tag_dir}, which does not "
                    f"split the model config's {list(target)}; the checkpoint and its trainer_state.json disagree"
                )
        return names, split

    # ------------------------------------------------------------------ TensorSource

    @property
    def has_vae(self) -> bool:
        """Whether the VAE's tensors are included (the run started from a BAGEL release)."""
        return self._vae is not None

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where the run's tokenizer files are: the BAGEL release it started from, else the data's tokenizer."""
        for path in (self.config.init.bagel_dir, self.config.data.text_tokenizer):
            if path:
                return Path(path)
        return None

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def shape(self, name: str) -> torch.Size:
        if is_vae_name(name) and self._vae is not None:
            return self._vae.shape(name[len(VAE_PREFIX) :])
        local, dim = self._ranks[0][name].shape, self._split_dims[name]
        return local if dim is None else torch.Size(n * self.tp if i == dim else n for i, n in enumerate(local))

    def dtype(self, name: str) -> torch.dtype:
        if is_vae_name(name) and self._vae is not None:
            return self._vae.dtype(name[len(VAE_PREFIX) :])
        return self._ranks[0][name].dtype

    def read(self, name: str) -> Tensor:
        if is_vae_name(name) and self._vae is not None:
            return self._vae.read(name[len(VAE_PREFIX) :])
        dim = self._split_dims[name]
        if dim is None:
            return self._ranks[0][name].read()
        return torch.cat([rank[name].read() for rank in self._ranks], dim=dim)

    def lazy(self, name: str) -> LazyTensor:
        return _Deferred(self.shape(name), lambda: self.read(name))

    def describe(self, name: str) -> str:
        if is_vae_name(name) and self._vae is not None:
            return f"{name!r} (the VAE of {self.config.init.bagel_dir}/{AE_FILE})"
        weights = f"Adam {self.adam_state}" if self.adam_state else "EMA weights" if self.ema else "weights"
        return f"{name!r} ({weights}) in {self.tag_dir} (tp={self.tp}, pp={self.pp}, ZeRO {self.zero_stage})"

    def close(self) -> None:
        if self._vae is not None:
            self._vae.close()


def _drop_tied(order: list[str], module: dict[str, Any]) -> list[str]:
    """``order`` without a later name whose module tensor is the same storage as an earlier one's (tied, ZeRO 0)."""
    kept, seen = [], set()
    for name in order:
        tensor = module.get(name)
        key = None
        if isinstance(tensor, Tensor) and tensor.numel() > 0:
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key is None or key not in seen:
            kept.append(name)
        if key is not None:
            seen.add(key)
    return kept
