"""FP8 linears with torchao's float8 casts and matmuls, tensor-parallel aware (the ``local`` TP backend).

Shape legend for one linear ``y = x W^T``: n tokens, k input features, m output features;
x [n, k], W [m, k], y and its gradient g [n, m].

Each of the three matmuls of a linear (output ``x W^T``, input gradient ``g W``, weight
gradient ``g^T x``) casts its two operands to float8 with torchao's recipe
(``Float8LinearConfig.from_recipe_name``): dynamic scaling, one scale per tensor
(``tensorwise``) or per row along the contraction axis (``rowwise``), e4m3 for
activations and weights, e5m2 (tensorwise) or e4m3 (rowwise) for gradients. The cast
and the matmul are torchao's (``Float8TrainingTensor``: ``torch._scaled_mm``, or fp32
after dequantising when ``emulate``); the weight, its gradient and the optimizer state
stay in the weight's own precision, and the high-precision input and weight are what the
backward saves (re-cast there), so activation memory and sequence parallelism's
regathering (``parallel/collectives.py``) are as without FP8.

Tensor parallelism: a scale must not depend on the layout, so the amax behind it is
reduced (MAX) over the tp group whenever the axes it spans include the split axis. The
linears make no collective of their own (``parallel/collectives.py``): a column-parallel
linear sees every token's whole input (also under sequence parallelism, whose ``project``
all-gathers before it) and splits m; a row-parallel one splits k and receives the whole
output gradient (the backward of ``reduce`` is an identity or an all-gather). The token
axis n is never split. Hence, per operand and its amax axes:

    tensorwise (all axes)      x [n,k]   W [m,k]   g [n,m]
        column (m split)         -         MAX       MAX
        row    (k split)         MAX       MAX       -
    rowwise (contraction axis)  output (k)   grad_input (m)   grad_weight (n)
        column                   -             MAX              -
        row                      MAX           -                -

so tp = 2 quantises exactly the values tp = 1 does, and the results differ by fp32
summation order only. (The rowwise recipes round scales down to powers of two, which leave
a value's mantissa as it is: there a slice's own amax would change only values that fall
into FP8's subnormal range. Tensorwise scales are not rounded, so every value depends on them.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingGranularity, ScalingType
from torchao.float8.float8_training_tensor import GemmInputRole, LinearMMConfig, ScaledMMConfig, hp_tensor_and_scale_to_float8
from torchao.float8.float8_utils import amax_to_scale, tensor_to_amax

from modus_mega.config import Float8Config
from modus_mega.parallel.tensor_parallel import TensorParallelColumnLinear, TensorParallelRowLinear

Axis = Literal["n", "k", "m"]  # tokens, input features, output features


@dataclass(frozen=True)
class Float8Scaling:
    """How one linear casts to FP8: torchao's recipe and matmul config, and its tensor-parallel split."""

    config: Float8LinearConfig  # torchao's per-operand cast configs
    mm: LinearMMConfig  # torchao's per-matmul config (emulation, fast accumulation, padding)
    split: Axis | None  # the axis split over tp: "m" (column-parallel), "k" (row-parallel), None (whole)
    group: dist.ProcessGroup | None  # the tp group that amaxes over ``split`` are reduced in

    @staticmethod
    def of(cfg: Float8Config, split: Axis | None = None, group: dist.ProcessGroup | None = None) -> "Float8Scaling":
        """The scaling of ``cfg``'s recipe for a linear split on ``split`` over ``group``."""
        config = Float8LinearConfig.from_recipe_name(cfg.recipe)

        def gemm(fast_accum: bool) -> ScaledMMConfig:
            # pad_inner_dim: torch._scaled_mm on GPUs needs multiples of 16, and the token count (the
            # weight gradient's inner dimension) of an expert is whatever the micro-batch routes to it.
            return ScaledMMConfig(emulate=cfg.emulate, use_fast_accum=fast_accum, fp8_output=False, pad_inner_dim=True)

        mm = LinearMMConfig(
            gemm(config.gemm_config_output.use_fast_accum),
            gemm(config.gemm_config_grad_input.use_fast_accum),
            gemm(config.gemm_config_grad_weight.use_fast_accum),
        )
        return Float8Scaling(config=config, mm=mm, split=split, group=group)


def _amax(t: Tensor, granularity: ScalingGranularity, axiswise_dim: int | None) -> Tensor:
    """This rank's amax of t: a scalar (tensorwise) or keepdim over ``axiswise_dim`` (rowwise)."""
    return tensor_to_amax(t, scaling_granularity=granularity, axiswise_dim=axiswise_dim)


def amax_spans_split(cast: CastConfig, axes: str, contraction: Axis, split: Axis | None) -> bool:
    """Whether the amax of an operand (axes named by ``axes``) spans the tp-split axis: every axis
    (tensorwise) or the contraction axis (rowwise). Then it is reduced over tp (module docstring)."""
    rowwise = cast.scaling_granularity is ScalingGranularity.AXISWISE
    return split is not None and split in (contraction if rowwise else axes)


def _cast(t: Tensor, cast: CastConfig, axes: str, contraction: Axis, role: GemmInputRole, s: Float8Scaling) -> Tensor:
    """One matmul operand ``t`` (axes named by ``axes``, its contraction axis first or last) in float8.

    Returns ``t`` unchanged when the recipe keeps it in high precision. The amax spans every
    axis (tensorwise) or the contraction axis (rowwise), and is reduced over tp when that
    span includes the split axis.
    """
    if cast.scaling_type is ScalingType.DISABLED:
        return t
    rowwise = cast.scaling_granularity is ScalingGranularity.AXISWISE
    axiswise_dim = axes.index(contraction) if rowwise else None
    amax = _amax(t, cast.scaling_granularity, axiswise_dim)
    if s.group is not None and amax_spans_split(cast, axes, contraction, s.split):
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=s.group)
    scale = amax_to_scale(amax, cast.target_dtype, s.config.round_scales_to_power_of_2)
    # torchao names an axiswise scale by the dimension reduced: 0 (a column's) or -1 (a row's)
    return hp_tensor_and_scale_to_float8(t, scale, cast.target_dtype, s.mm, role, -1 if axiswise_dim == 1 else axiswise_dim)


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T with each of the three matmuls in float8 (module docstring); x [n, k], W [m, k] -> y [n, m]."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, s: Float8Scaling) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.scaling = s
        c, w_t = s.config, weight.t()
        a = _cast(x, c.cast_config_input, "nk", "k", GemmInputRole.INPUT, s)
        b = _cast(w_t, c.cast_config_weight, "km", "k", GemmInputRole.WEIGHT, s)
        return torch.mm(a, b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight = ctx.saved_tensors
        s: Float8Scaling = ctx.scaling
        c = s.config
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            a = _cast(grad, c.cast_config_grad_output, "nm", "m", GemmInputRole.GRAD_OUTPUT, s)
            b = _cast(weight, c.cast_config_weight_for_grad_input, "mk", "m", GemmInputRole.WEIGHT, s)
            grad_x = torch.mm(a, b)  # [n, k]
        if ctx.needs_input_grad[1]:
            a = _cast(grad.t(), c.cast_config_grad_output_for_grad_weight, "mn", "n", GemmInputRole.GRAD_OUTPUT, s)
            b = _cast(x, c.cast_config_input_for_grad_weight, "nk", "n", GemmInputRole.INPUT, s)
            grad_w = torch.mm(a, b)  # [m, k]
        return grad_x, grad_w, None


def float8_linear(x: Tensor, weight: Tensor, scaling: Float8Scaling) -> Tensor:
    """x [..., k] @ weight [m, k]^T -> [..., m] with the matmuls in float8 (no bias).

    An expert without tokens in this micro-batch (both experts run every step) has nothing to
    scale: it takes the plain product (empty output, zero weight gradient). Every tp rank routes
    the same tokens, so all of them skip the amax reductions together.
    """
    if x.numel() == 0:
        return F.linear(x, weight)
    y = _Float8Matmul.apply(x.reshape(-1, x.shape[-1]), weight, scaling)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class _Float8Forward:
    """The forward of a linear whose matmuls run in float8; mixed into the linear classes below.

    ``apply_float8`` sets ``float8`` and re-classes an existing linear in place, so the module
    object, its parameters, hooks, attributes and state-dict keys (Megatron's ``_extra_state``
    included) all stay what they were; only the forward changes.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    float8: Float8Scaling

    def forward(self, x: Tensor) -> Tensor:
        """x [..., k] -> [..., m] (this rank's slice or partial sum under tensor parallelism)."""
        return self._add_bias(float8_linear(x, self.weight, self.float8))

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias


class Float8Linear(_Float8Forward, nn.Linear):
    """``nn.Linear`` (tp = 1) with float8 matmuls."""


class Float8ColumnLinear(_Float8Forward, TensorParallelColumnLinear):
    """``TensorParallelColumnLinear`` with float8 matmuls; amaxes over m are reduced over tp."""


class Float8RowLinear(_Float8Forward, TensorParallelRowLinear):
    """``TensorParallelRowLinear`` with float8 matmuls; amaxes over k are reduced over tp."""

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias_share * self.bias  # the bias counted once in the tp sum


# Each linear class the model is built with -> (its float8 class, the axis it splits over tp).
FLOAT8_CLASSES: dict[type[nn.Module], tuple[type[nn.Module], Axis | None]] = {
    nn.Linear: (Float8Linear, None),
    TensorParallelColumnLinear: (Float8ColumnLinear, "m"),
    TensorParallelRowLinear: (Float8RowLinear, "k"),
}


def to_float8(linear: nn.Module, cfg: Float8Config, group: dist.ProcessGroup | None) -> None:
    """Make ``linear`` (one of ``FLOAT8_CLASSES``) compute in float8, in place; ``group`` is its tp group.

    Raises ``ValueError`` for any other linear class (e.g. Transformer Engine's, which has its own FP8).
    """
    if type(linear) not in FLOAT8_CLASSES:
        raise ValueError(
            f"torchao FP8 cannot convert a {type(linear).__name__}; it converts {[c.__name__ for c in FLOAT8_CLASSES]} "
            "(parallel.tp_backend=local). Transformer Engine linears run FP8 under its autocast instead"
        )
    float8_class, split = FLOAT8_CLASSES[type(linear)]
    linear.float8 = Float8Scaling.of(cfg, split, group if split is not None else None)
    linear.__class__ = float8_class
