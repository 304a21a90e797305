"""Transformer Engine tensor-parallel linears (GPU only), behind ``HAVE_TE`` (STYLE 8).

Selected with ``parallel.tp_backend = "te"``. Same contract as ``build_linears``: q/k/v,
gate/up and the LM head column-parallel, o and down row-parallel, plain-tensor outputs,
no collective in the linears (TE's ``parallel_mode=None`` on this rank's slice: the model's
``Collectives`` communicate, with or without sequence parallelism), the row-parallel bias
added on tp rank 0 only; the token embedding stays Megatron-core's vocab-parallel one (TE
has none). Weights are allocated uninitialised and filled by ``init_hooks`` like the local
backend's, so the full weights do not depend on the backend either. Untested on the
CPU-only CI machines.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor, nn

from modus_mega.config import LLMConfig
from modus_mega.model.layers import LinearFactory
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.tensor_parallel import (
    TensorParallelEmbedding,
    build_collectives,
    check_tensor_parallel,
    megatron_config,
)

try:
    import transformer_engine.pytorch as te

    HAVE_TE = True
except ImportError:  # CPU machines, or GPU machines without TE
    te = None
    HAVE_TE = False


def _no_init(weight: Tensor) -> None:
    """TE's ``init_method`` slot; ``init_hooks`` initialises instead."""


def _te_linear(in_features: int, out_features: int, bias: bool, *, mode: str, ctx: ParallelContext) -> nn.Module:
    """This rank's slice of a column- or row-parallel linear, as a TE linear that communicates nothing."""
    column = mode == "column"
    split = out_features if column else in_features
    if split % ctx.tp:
        raise ValueError(f"a {mode}-parallel linear of {in_features} -> {out_features} features cannot be split over tp={ctx.tp}")
    layer = te.Linear(
        in_features if column else in_features // ctx.tp, out_features // ctx.tp if column else out_features,
        bias=bias, init_method=_no_init, parallel_mode=None, return_bias=bias and not column,
        params_dtype=torch.float32, device=ctx.device,
    )  # fmt: skip
    set_tensor_model_parallel_attributes(layer.weight, True, 0 if column else 1, 1)
    if bias and column:
        set_tensor_model_parallel_attributes(layer.bias, True, 0, 1)
    if bias and not column:
        layer.register_forward_hook(partial(_add_bias_share, share=1.0 if ctx.tp_rank == 0 else 0.0))
    return layer


def _add_bias_share(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor], share: float) -> Tensor:
    """A row-parallel TE linear's (output, bias) -> output + this rank's share of the bias (all on tp rank 0).

    Every rank uses the bias, so every rank's gradient hook (``apply_tensor_parallel``) runs its collective.
    """
    y, bias = output
    return y + share * bias


def build_te_linears(ctx: ParallelContext, llm: LLMConfig) -> LinearFactory:
    """The Transformer Engine ``LinearFactory``; raises ``ValueError`` where TE cannot run."""
    if not HAVE_TE:
        raise ValueError(
            "parallel.tp_backend='te' needs Transformer Engine, which is not installed; "
            "install it on a GPU machine (MODUS_GPU=1 bash scripts/install.sh) or use tp_backend='local'"
        )
    if ctx.device.type != "cuda":
        raise ValueError("parallel.tp_backend='te' runs on GPUs only; use tp_backend='local' on CPU")
    check_tensor_parallel(ctx, llm)  # the same layout checks as the local backend
    return LinearFactory(
        column=partial(_te_linear, mode="column", ctx=ctx),
        row=partial(_te_linear, mode="row", ctx=ctx),
        embedding=partial(TensorParallelEmbedding, config=megatron_config(ctx), ctx=ctx),
        tp_size=ctx.tp,
        collectives=build_collectives(ctx),
    )
