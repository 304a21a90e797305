"""Exponential moving average of the trainable weights (``training.ema_decay``), in fp32.

After every optimizer step that was applied (a skipped non-finite step is not averaged)::

    ema = decay * ema + (1 - decay) * w

starting from the initial weights (BAGEL keeps such an EMA, at decay 0.9999, and releases
it as ``ema.safetensors``). ``w`` is the fp32 master weight the optimizer updates, and each
rank averages exactly the part of it that its own optimizer owns:

- ZeRO 1 and 2 (and DeepSpeed's bf16 optimizer, which partitions the same way): the
  fragment of each parameter inside this rank's flat fp32 partition
  (``param._hp_mapping``), so the EMA is partitioned over data-parallel ranks like the
  master weights (the planner's ``ema = "sharded"``);
- ZeRO 3: this rank's fp32 partition of each parameter (``safe_get_local_fp32_param``);
- no ZeRO and no mixed precision (fp32, CPU): the parameters themselves are the master
  weights, held whole by every data-parallel rank, and so is the EMA (``"replicated"``).

Under tensor parallelism each rank averages its own tp shard. A piece is addressed by the
parameter's name (as ``named_parameters`` gives it, the same at every layout) and its
offset in the flattened tp-local parameter; ``assemble_ema`` joins the pieces of a
tp rank's data-parallel ranks (e.g. read from the checkpoint extras) into whole tensors.
The state is saved in and restored from training checkpoints (``training/checkpoint.py``)
and resuming keeps it bit-identical; it must be resumed at the layout it was saved with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class _Piece:
    """The part of one trainable parameter this rank's optimizer owns."""

    name: str
    start: int  # offset in the flattened tp-local parameter
    value: Tensor  # [numel] fp32 view of the master weights (or the parameter itself)


def _master_piece(name: str, param: nn.Parameter) -> _Piece | None:
    """This rank's fp32 master piece of ``param``; None when another data-parallel rank owns all of it."""
    if hasattr(param, "ds_id"):  # ZeRO-3: every rank owns a fixed-size slice of every parameter
        from deepspeed.utils import safe_get_local_fp32_param

        size = param.ds_tensor.ds_numel  # the padded partition size
        start = dist.get_rank(group=param.ds_process_group) * size
        valid = min(size, param.ds_numel - start)
        if valid <= 0:
            return None
        return _Piece(name, start, safe_get_local_fp32_param(param).view(-1)[:valid])
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 or bf16: a fragment of this rank's flat fp32 partition
        fragment = param._hp_mapping
        if fragment is None:
            return None
        return _Piece(name, fragment.lp_fragment_address.start, fragment.get_hp_fragment().view(-1))
    if param.dtype != torch.float32:
        raise ValueError(
            f"parameter {name} is {param.dtype} and no optimizer holds fp32 master weights for it; "
            "the EMA needs fp32 weights: train in fp32 or through DeepSpeed's bf16 / ZeRO optimizers"
        )
    return _Piece(name, 0, param.detach().view(-1))


class EmaWeights:
    """The fp32 EMA of this rank's part of the trainable weights (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must lie in (0, 1); training.ema_decay = 0 disables the EMA instead")
        self.decay = decay
        self._params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.numels = {name: _full_numel(p) for name, p in self._params}  # of each tp-local parameter
        self.shapes = {name: _full_shape(p) for name, p in self._params}
        self.shadow: dict[str, Tensor] = {}  # name -> [piece numel] fp32
        self.starts: dict[str, int] = {}  # name -> offset of the piece in the flattened parameter
        self.reset()

    def _pieces(self) -> list[_Piece]:
        # Fetched anew each time: DeepSpeed re-links the fp32 fragments when it loads a checkpoint.
        return [piece for name, p in self._params if (piece := _master_piece(name, p)) is not None]

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current weights (a fresh run, or a checkpoint saved without EMA)."""
        pieces = self._pieces()
        self.shadow = {piece.name: piece.value.detach().float().clone() for piece in pieces}
        self.starts = {piece.name: piece.start for piece in pieces}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights of the optimizer step just applied into the average."""
        pieces = self._pieces()
        assert [p.name for p in pieces] == list(self.shadow), "the optimizer's partition of the weights changed"
        shadows = [self.shadow[p.name] for p in pieces]
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, [p.value.float() for p in pieces], alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (tensors and plain data: loadable with ``weights_only=True``)."""
        return {
            "decay": self.decay,
            "tensors": self.shadow,
            "starts": self.starts,
            "numels": {name: self.numels[name] for name in self.shadow},
            "shapes": {name: list(self.shapes[name]) for name in self.shadow},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved EMA; raises ``ValueError`` when it was saved at another layout or model."""
        if state["starts"] != self.starts or state["numels"] != {n: self.numels[n] for n in self.shadow}:
            mine, saved = set(self.starts), set(state["starts"])
            raise ValueError(
                "the checkpoint's EMA pieces do not match this rank's "
                f"(only saved: {sorted(saved - mine)[:3]}, only here: {sorted(mine - saved)[:3]}, "
                f"offsets equal: {state['starts'] == self.starts}); resume at the layout the checkpoint was "
                "saved with (tp, pp, dp, ZeRO stage)"
            )
        if state["decay"] != self.decay:
            raise ValueError(
                f"the checkpoint's EMA has decay {state['decay']} but training.ema_decay is {self.decay}; "
                "set training.ema_decay to the saved value"
            )
        for name, tensor in state["tensors"].items():
            self.shadow[name].copy_(tensor)


def assemble_ema(states: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Whole tp-local EMA tensors from the ``state_dict``s of one tp rank's data-parallel ranks.

    Raises ``ValueError`` when the pieces leave part of a parameter uncovered (a rank's state missing).
    """
    numels: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for state in states:
        numels |= state["numels"]
        shapes |= state["shapes"]
    flat = {name: torch.zeros(numel, dtype=torch.float32) for name, numel in numels.items()}
    covered = {name: torch.zeros(numel, dtype=torch.bool) for name, numel in numels.items()}
    for state in states:
        for name, tensor in state["tensors"].items():
            start = state["starts"][name]
            flat[name][start : start + tensor.numel()] = tensor.cpu()
            covered[name][start : start + tensor.numel()] = True
    missing = [name for name, mask in covered.items() if not bool(mask.all())]
    if missing:
        raise ValueError(
            f"the EMA pieces leave {len(missing)} parameters partly uncovered (e.g. {missing[0]}); "
            "pass the states of every data-parallel rank of this tp rank"
        )
    return {name: flat[name].view(shapes[name]) for name in flat}


def _full_numel(param: nn.Parameter) -> int:
    return int(param.ds_numel) if hasattr(param, "ds_numel") else param.numel()


def _full_shape(param: nn.Parameter) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
