"""Universal checkpoints: a training checkpoint as full tensors, so a run continues at another layout.

DeepSpeed's workflow (``ds_to_universal.py`` offline, then ``load_universal`` at start-up),
for MODUS's parameter names and optimizer. Offline, once per tag::

    python -m modus_mega.convert universal RUN_DIR/checkpoints/<tag>

writes next to the tag's own files::

    <tag>/universal/
        universal.json              the manifest: source layout, training step, AdamW step, EMA decay,
                                    every tensor's name, full shape and whether it is trained
        zero/<name>/fp32.pt         {"param": fp32 tensor}: the master weight (frozen: the module's tensor)
        zero/<name>/exp_avg.pt      {"param": ...}: AdamW's first moment (trained parameters)
        zero/<name>/exp_avg_sq.pt   {"param": ...}: AdamW's second moment (trained parameters)
        ema/<name>.pt               {"param": ...}: the EMA (trained parameters; runs with training.ema_decay > 0)

``<name>`` is the model's global parameter name (``ModusModel.named_parameters``, the same
at every tp and pp) and every tensor is whole: tp pieces joined, ZeRO partitions and their
padding dropped (``deepspeed_run.DeepSpeedRunSource`` reads any tp, pp, ZeRO 0-3 layout).
The parameter folders and their files are DeepSpeed's universal layout. Where it differs:
the AdamW step count is one number in the manifest (our optimizer steps all parameters
together; DeepSpeed repeats it as ``step.pt`` in every folder); the EMA has its own tree
(DeepSpeed's loader takes every file of a parameter folder for optimizer state); and
DeepSpeed's copies of the model-states files are not written (nothing here reads them).
Files are written one tensor at a time into a temporary directory renamed into place at
the end, and read back with ``torch.load(weights_only=True)``.

Loading (``load_universal``, called by ``training.checkpoint.load_checkpoint`` when the
latest tag was saved at another layout). Each rank reads only its own parameters' files
(its pipeline stage's; memory-mapped) and cuts its tensor-parallel slice with the shard
hook the initialisation uses (``parallel.tensor_parallel.init_hooks``). Then:

- weights: the module's parameter (what the forward pass reads) and, where a DeepSpeed
  optimizer keeps fp32 master copies (ZeRO 1-2, and bf16), this rank's part of them
  (``deepspeed.utils.safe_set_full_fp32_param``);
- Adam: the optimizer's state is first created as AdamW creates it at its first step
  (zero moments) with the saved step count, through torch's ``Optimizer.load_state_dict``,
  and linked to DeepSpeed's per-parameter fragments of the flat partitions
  (``deepspeed.utils.lazy_init_hp_params_optimizer_state``, what DeepSpeed itself does after
  its first step); then ``safe_set_full_optimizer_state`` writes this rank's part of each
  moment (ZeRO 1-2), or the parameter's own state tensor is set (ZeRO 0 in fp32, where the
  parameters are the master weights);
- the EMA: this rank's pieces (``parallel/ema.py``: the part of each weight its optimizer
  owns) cut from the full EMA; a source without EMA restarts the average at the weights.

ZeRO 3 as the target is refused (its parameters and optimizer sub-groups are partitioned
differently; not built). Every value is copied, never recomputed: the restored weights,
moments and EMA equal the saved run's bit for bit, and the next step's loss differs from
the uninterrupted run's only by the new layout's order of floating-point sums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.utils import (
    lazy_init_hp_params_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import Tensor, nn

from modus_mega.checkpoint_layout import (
    CHECKPOINTS_DIR,
    TRAINER_STATE,
    UNIVERSAL_DIR,
    latest_tag,
    run_checkpoints,
    saved_layout,
)
from modus_mega.convert.deepspeed_run import ADAM_STATES, DeepSpeedRunSource, is_run_dir
from modus_mega.convert.files import atomic_directory, progress_bar, read_json, write_json
from modus_mega.model.init import ShardFn
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.ema import EmaWeights
from modus_mega.parallel.pipeline import global_parameter_name
from modus_mega.parallel.tensor_parallel import init_hooks

MANIFEST = "universal.json"
FORMAT = 1  # the manifest's "format"; bumped when the layout changes
ZERO_DIR = "zero"  # per parameter: fp32.pt and the Adam moments (DeepSpeed's folder)
EMA_DIR = "ema"
FP32 = "fp32"  # DeepSpeed's name of the master-weight file
PARAM = "param"  # the key of the tensor in each file (DeepSpeed's)


def checkpoint_tag(path: str | Path) -> Path:
    """The tag directory ``path`` names: a tag itself, or a run directory's latest tag."""
    path = Path(path)
    if is_run_dir(path):
        tag = latest_tag(run_checkpoints(path))
        if tag is None:
            raise ValueError(f"{path} holds no completed checkpoint ({run_checkpoints(path)} has no latest tag)")
        path = run_checkpoints(path) / tag
    if not (path / TRAINER_STATE).is_file() or path.parent.name != CHECKPOINTS_DIR:
        raise ValueError(
            f"{path} is not a checkpoint tag of a training run: pass RUN_DIR/{CHECKPOINTS_DIR}/<tag> "
            f"(a directory holding {TRAINER_STATE}) or the run directory itself (its latest tag)"
        )
    return path


def write_universal(path: str | Path, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the universal form of the checkpoint tag ``path`` (or a run's latest) into ``<tag>/universal``.

    Reads any tp, pp and ZeRO 0-3 layout; streams one tensor at a time; the output appears
    only once complete. An existing universal form is refused unless ``overwrite``.
    Returns the directory written.
    """
    tag_dir = checkpoint_tag(path)
    run_dir, tag = tag_dir.parent.parent, tag_dir.name
    layout = saved_layout(tag_dir)
    with ExitStack() as stack:
        weights = stack.enter_context(DeepSpeedRunSource(run_dir, tag=tag, with_vae=False))
        moments = {
            key: stack.enter_context(DeepSpeedRunSource(run_dir, tag=tag, adam_state=key)) for key in ADAM_STATES
        }
        trained = set(moments[ADAM_STATES[0]].names())
        decay = weights.config.training.ema_decay
        ema = stack.enter_context(DeepSpeedRunSource(run_dir, tag=tag, ema=True, with_vae=False)) if decay > 0 else None
        files_per_trained = 1 + len(moments) + (ema is not None)
        total = sum(weights.shape(n).numel() * 4 * (files_per_trained if n in trained else 1) for n in weights.names())
        manifest = {
            "format": FORMAT,
            "tag": tag,
            "step": weights.step,
            "optimizer_step": moments[ADAM_STATES[0]].optimizer_step,
            "source_layout": dataclasses.asdict(layout),
            "ema_decay": decay if ema is not None else None,
            "tensors": {n: {"shape": list(weights.shape(n)), "trained": n in trained} for n in weights.names()},
        }
        out = tag_dir / UNIVERSAL_DIR
        with atomic_directory(out, overwrite=overwrite) as tmp:
            bar = stack.enter_context(progress_bar(total, f"universal {tag}", progress))
            for name in weights.names():
                files = [(tmp / ZERO_DIR / name / f"{FP32}.pt", weights)]
                if name in trained:
                    files += [(tmp / ZERO_DIR / name / f"{key}.pt", source) for key, source in moments.items()]
                    files += [(tmp / EMA_DIR / f"{name}.pt", ema)] if ema is not None else []
                for file, source in files:
                    file.parent.mkdir(parents=True, exist_ok=True)
                    tensor = source.read(name)
                    torch.save({PARAM: _fp32_copy(tensor)}, file)  # a copy: a read may view a whole partition
                    bar.update(tensor.numel() * 4)
            write_json(tmp / MANIFEST, manifest)
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the universal checkpoint in ``folder``; refuses another format."""
    manifest = read_json(folder / MANIFEST, "the universal checkpoint's manifest")
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{folder / MANIFEST} has format {manifest.get('format')!r}, this code reads {FORMAT}; write it "
            f"again: python -m modus_mega.convert universal {folder.parent} --overwrite"
        )
    return manifest


def read_tensor(folder: Path, name: str, kind: str) -> Tensor:
    """The full tensor ``kind`` (``fp32``, an Adam moment or ``ema``) of parameter ``name``, memory-mapped."""
    path = folder / EMA_DIR / f"{name}.pt" if kind == EMA_DIR else folder / ZERO_DIR / name / f"{kind}.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the universal checkpoint {folder} is incomplete; write it again: "
                         f"python -m modus_mega.convert universal {folder.parent} --overwrite")  # fmt: skip
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)[PARAM]


@torch.no_grad()
def load_universal(
    engine: deepspeed.DeepSpeedEngine,
    optimizer: torch.optim.Optimizer,
    ema: EmaWeights | None,
    folder: Path,
    ctx: ParallelContext,
) -> None:
    """Set this rank's weights, Adam state and EMA from the universal checkpoint in ``folder``.

    ``engine`` is DeepSpeed's (its module is this rank's model or pipeline stage),
    ``optimizer`` the torch optimizer it steps, ``ema`` the run's EMA, if any.

    Collective only through what DeepSpeed's setters do (nothing at ZeRO 0-2). Raises
    ``ValueError`` when the target is ZeRO 3, or when a parameter of this model is missing
    from the checkpoint, has another full shape, or is trained here but was frozen there.
    """
    manifest = read_manifest(folder)
    if engine.zero_optimization_stage() == 3:
        raise ValueError(
            f"resuming from the universal checkpoint {folder} at ZeRO 3 is not supported (its parameters and "
            "optimizer sub-groups are partitioned per parameter); resume at parallel.zero_stage 0, 1 or 2"
        )
    rename = global_parameter_name if ctx.pp > 1 else str
    hooks = init_hooks(ctx)
    params = dict(engine.module.named_parameters())
    for local_name, param in params.items():
        _check_parameter(rename(local_name), param, hooks["full_shape"](param), manifest, folder)
    _init_adam_state(optimizer, engine.module, manifest["optimizer_step"])
    for local_name, param in params.items():
        name = rename(local_name)
        _set_weight(param, hooks["shard"](param, read_tensor(folder, name, FP32)))
        if param.requires_grad:
            for key in ADAM_STATES:
                _set_moment(optimizer, param, hooks["shard"](param, read_tensor(folder, name, key)), key)
    if ema is not None:
        _load_ema(ema, folder, manifest, params, rename, hooks["shard"])


def _check_parameter(name: str, param: nn.Parameter, full_shape: torch.Size, manifest: dict, folder: Path) -> None:
    entry = manifest["tensors"].get(name)
    if entry is None or list(full_shape) != entry["shape"]:
        saved = "no such tensor" if entry is None else f"shape {entry['shape']}"
        raise ValueError(
            f"this run's parameter {name!r} has full shape {list(full_shape)}, but the universal checkpoint "
            f"{folder} holds {saved}; resume with the model config the checkpoint was saved with"
        )
    if param.requires_grad and not entry["trained"]:
        raise ValueError(
            f"{name!r} is trained in this run but was frozen in the run that saved {folder}, so it has no Adam "
            "state; freeze it here too (model.llm.freeze_1d_expert) or start a new run from exported weights"
        )


def _init_adam_state(optimizer: torch.optim.Optimizer, model: nn.Module, step: int) -> None:
    """Give every tensor ``optimizer`` steps AdamW's state as created at its first step (zero moments), at ``step``.

    Under DeepSpeed's ZeRO 1-2 / bf16 optimizers those tensors are the flat fp32 partitions;
    each model parameter's fragment of them is linked to the new moments, so that
    ``safe_set_full_optimizer_state`` writes into them.
    """
    flats = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        for i, p in enumerate(flats)
    }
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    for index, group in enumerate(optimizer.param_groups):
        fragments = [
            p for p in model.parameters()
            if getattr(p, "_hp_mapping", None) is not None and p._hp_mapping.param_group_index == index
        ]  # fmt: skip
        if fragments:
            (flat,) = group["params"]  # DeepSpeed: one flat fp32 partition per parameter group
            lazy_init_hp_params_optimizer_state(fragments, flat, optimizer.state)


def _set_weight(param: nn.Parameter, value: Tensor) -> None:
    """The module's tensor and, where DeepSpeed keeps one, this rank's part of its fp32 master copy."""
    param.data.copy_(value)
    if hasattr(param, "_hp_mapping"):
        safe_set_full_fp32_param(param, value)


def _set_moment(optimizer: torch.optim.Optimizer, param: nn.Parameter, value: Tensor, key: str) -> None:
    """This rank's part of Adam moment ``key`` of ``param``."""
    if hasattr(param, "_hp_mapping"):
        safe_set_full_optimizer_state(param, value, key)
    else:  # no DeepSpeed optimizer between: the torch state of the parameter itself
        optimizer.state[param][key].copy_(value)


def _load_ema(
    ema: EmaWeights,
    folder: Path,
    manifest: dict[str, Any],
    params: dict[str, nn.Parameter],
    rename: Callable[[str], str],
    shard: ShardFn,
) -> None:
    """This rank's EMA pieces, cut from the full EMA (or restarted at the weights when the source kept none)."""
    if manifest["ema_decay"] is None:
        ema.reset()
        return
    state = ema.state_dict()  # this rank's pieces: where each starts, how long
    tensors = {}
    for name, piece in state["tensors"].items():
        local = shard(params[name], read_tensor(folder, rename(name), EMA_DIR)).reshape(-1)  # [tp-local numel]
        tensors[name] = local[state["starts"][name] : state["starts"][name] + piece.numel()]
    ema.load_state_dict({**state, "decay": manifest["ema_decay"], "tensors": tensors})


def _fp32_copy(tensor: Tensor) -> Tensor:
    out = torch.empty(tensor.shape, dtype=torch.float32)
    out.copy_(tensor)
    return out
