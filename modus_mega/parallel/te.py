"""Transformer Engine tensor-parallel linears (GPU only), behind ``HAVE_TE`` (STYLE 8).

Selected with ``parallel.tp_backend = "te"``. Same contract as ``build_linears``: q/k/v,
gate/up and the LM head column-parallel, o and down row-parallel, plain-tensor outputs;
the token embedding stays Megatron-core's vocab-parallel one (TE has none). Weights are
allocated uninitialised and filled by ``init_hooks`` like the local backend's, so the
full weights do not depend on the backend either. Untested on the CPU-only CI machines.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor, nn

from modus_mega.config import LLMConfig
from modus_mega.model.layers import LinearFactory
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.tensor_parallel import TensorParallelEmbedding, build_linears, megatron_config

try:
    import transformer_engine.pytorch as te

    HAVE_TE = True
except ImportError:  # CPU machines, or GPU machines without TE
    te = None
    HAVE_TE = False


def _no_init(weight: Tensor) -> None:
    """TE's ``init_method`` slot; ``init_hooks`` initialises instead."""


def _te_linear(in_features: int, out_features: int, bias: bool, *, mode: str, ctx: ParallelContext) -> nn.Module:
    layer = te.Linear(
        in_features, out_features, bias=bias, init_method=_no_init, tp_group=ctx.tp_group, tp_size=ctx.tp,
        parallel_mode=mode, params_dtype=torch.float32, device=ctx.device,
    )  # fmt: skip
    set_tensor_model_parallel_attributes(layer.weight, True, 0 if mode == "column" else 1, 1)
    if bias and mode == "column":
        set_tensor_model_parallel_attributes(layer.bias, True, 0, 1)
    return layer


def build_te_linears(ctx: ParallelContext, llm: LLMConfig) -> LinearFactory:
    """The Transformer Engine ``LinearFactory``; raises ``ValueError`` where TE cannot run."""
    if not HAVE_TE:
        raise ValueError(
            "parallel.tp_backend='te' needs Transformer Engine, which is not installed; "
            "install it on a GPU machine (MODUS_GPU=1 bash scripts/install.sh) or use tp_backend='local'"
        )
    if ctx.device.type != "cuda":
        raise ValueError("parallel.tp_backend='te' runs on GPUs only; use tp_backend='local' on CPU")
    build_linears(ctx, llm)  # the same layout checks as the local backend
    return LinearFactory(
        column=partial(_te_linear, mode="column", ctx=ctx),
        row=partial(_te_linear, mode="row", ctx=ctx),
        embedding=partial(TensorParallelEmbedding, config=megatron_config(ctx), ctx=ctx),
        tp_size=ctx.tp,
    )
