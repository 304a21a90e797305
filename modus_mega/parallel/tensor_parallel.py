"""Tensor parallelism with Megatron-core layers, applied from outside the model (STYLE 1, 2).

Order of use (``parallel/build.py`` follows it):

1. ``build_linears(ctx)`` -> the ``LinearFactory`` the model is built with: q/k/v, gate/up
   and the LM head column-parallel (output features split), o and down row-parallel
   (input features split), the token embedding vocab-parallel, and the ``Collectives``
   the model makes around them (``parallel/collectives.py``: the linears make none, so
   each block makes one collective for both experts; with ``parallel.sequence_parallel``
   the residual stream is also split along tokens).
2. ``apply_tensor_parallel(model, ctx)`` -> fixes the few replicated weights whose
   gradient on one rank is a partial sum: their gradients are summed over tp.
3. ``init_weights(..., **init_hooks(ctx))`` -> every parameter drawn in full from its
   name's seed, then sliced, so the full weights equal the serial model's (STYLE 3).

The LM head's logits stay vocab-sharded [N_ce, V/tp]; ``cross_entropy_fn(ctx)`` returns
the matching loss. At tp = 1 everything here is plain ``torch.nn`` (``SERIAL_LINEARS``).

Megatron's layers take [sequence, batch, features] and return ``(output, bias)``; the
subclasses below take the model's [T, features] and return the output alone. They are
built with ``use_cpu_initialization=True, perform_initialization=False``: Megatron's
CUDA RNG tracker is never touched, and ``init_hooks`` does the initialisation instead.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import Tensor, nn

from modus_mega.config import LLMConfig
from modus_mega.losses import CrossEntropyFn, serial_cross_entropy
from modus_mega.model.init import FullShapeFn, ShardFn
from modus_mega.model.layers import SERIAL_LINEARS, Collectives, LinearFactory
from modus_mega.model.mot import MoTExpert
from modus_mega.parallel.collectives import SequenceParallelCollectives, TensorParallelCollectives
from modus_mega.parallel.context import ParallelContext


def _no_init(weight: Tensor) -> None:
    """Megatron's ``init_method`` slot; ``init_hooks`` initialises instead."""


class TensorParallelColumnLinear(ColumnParallelLinear):
    """Column-parallel linear: x [T, D_in] (replicated) -> y [T, D_out / tp] (this rank's slice).

    Makes no collective: the input gradient it returns is this rank's partial sum, which the
    model's ``Collectives`` sum over tp (``disable_grad_reduce``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, config: ModelParallelConfig, ctx: ParallelContext) -> None:
        if out_features % ctx.tp:
            raise ValueError(f"a column-parallel linear of {out_features} outputs cannot be split over tp={ctx.tp}")
        super().__init__(
            in_features, out_features, config=config, init_method=_no_init, bias=bias,
            gather_output=False, skip_bias_add=False, tp_group=ctx.tp_group, disable_grad_reduce=True,
        )  # fmt: skip
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        y, _ = super().forward(x.unsqueeze(1))  # Megatron's [s, b, h] with b = 1
        return y.squeeze(1)


class TensorParallelRowLinear(RowParallelLinear):
    """Row-parallel linear: x [T, D_in / tp] (this rank's slice) -> y [T, D_out], this rank's partial sum.

    Makes no collective (Megatron's expert mode: the caller communicates); the model's
    ``Collectives`` sum the partial outputs over tp. The bias is added on tp rank 0 only, so the
    sum counts it once; its gradient is summed over tp by ``apply_tensor_parallel``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, config: ModelParallelConfig, ctx: ParallelContext) -> None:
        if in_features % ctx.tp:
            raise ValueError(f"a row-parallel linear of {in_features} inputs cannot be split over tp={ctx.tp}")
        super().__init__(
            in_features, out_features, config=config, init_method=_no_init, bias=bias,
            input_is_parallel=True, skip_bias_add=True, is_expert=True, tp_group=ctx.tp_group,
        )  # fmt: skip
        set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
        self.bias_share = 1.0 if ctx.tp_rank == 0 else 0.0  # of the bias this rank adds

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        y, bias = super().forward(x.unsqueeze(1))
        y = y.squeeze(1)
        # Every rank uses the bias (times 0 or 1) so every rank's gradient hook runs its collective.
        return y if bias is None else y + self.bias_share * bias


class TensorParallelEmbedding(VocabParallelEmbedding):
    """Vocab-parallel embedding: ids [N] -> [N, D]; each rank holds V / tp rows."""

    def __init__(self, num_embeddings: int, dim: int, *, config: ModelParallelConfig, ctx: ParallelContext) -> None:
        if num_embeddings % ctx.tp:
            raise ValueError(
                f"the padded vocabulary ({num_embeddings} rows) cannot be split over tp={ctx.tp}; "
                "set model.vocab.vocab_multiple to a multiple of parallel.tp"
            )
        super().__init__(num_embeddings, dim, init_method=_no_init, config=config, tp_group=ctx.tp_group)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)


def megatron_config(ctx: ParallelContext) -> ModelParallelConfig:
    """Megatron's layer config for this layout: CPU allocation, no Megatron-side init, no fusions.

    ``sequence_parallel`` stays off: the layers make no collective, our ``Collectives`` do.
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=ctx.tp,
        pipeline_model_parallel_size=ctx.pp,
        pipeline_dtype=torch.float32 if ctx.pp > 1 else None,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def build_linears(ctx: ParallelContext, llm: LLMConfig) -> LinearFactory:
    """The ``LinearFactory`` for this layout: ``torch.nn`` at tp = 1, Megatron-core above.

    Raises ``ValueError`` where the layout cannot shard the model (``check_tensor_parallel``).
    """
    if ctx.tp == 1:
        return SERIAL_LINEARS
    check_tensor_parallel(ctx, llm)
    config = megatron_config(ctx)
    return LinearFactory(
        column=partial(TensorParallelColumnLinear, config=config, ctx=ctx),
        row=partial(TensorParallelRowLinear, config=config, ctx=ctx),
        embedding=partial(TensorParallelEmbedding, config=config, ctx=ctx),
        tp_size=ctx.tp,
        collectives=build_collectives(ctx),
    )


def check_tensor_parallel(ctx: ParallelContext, llm: LLMConfig) -> None:
    """Raise ``ValueError`` when tp does not divide the key/value heads: each rank needs whole KV heads.

    (Replicating KV heads across ranks is not supported yet.) Every tensor-parallel backend checks this.
    """
    if llm.num_kv_heads % ctx.tp:
        raise ValueError(
            f"parallel.tp={ctx.tp} does not divide model.llm.num_kv_heads={llm.num_kv_heads}: every rank "
            "must hold whole key/value heads; use tp <= num_kv_heads and a divisor of it"
        )


def build_collectives(ctx: ParallelContext) -> Collectives:
    """The collectives the model makes around this layout's parallel linears (tp > 1)."""
    return SequenceParallelCollectives(ctx) if ctx.sequence_parallel else TensorParallelCollectives(ctx.tp_group)


def apply_tensor_parallel(model: nn.Module, ctx: ParallelContext) -> None:
    """Make replicated weights whose gradient on one rank is a partial sum receive the full gradient.

    A hook on each sums its gradient over tp as autograd produces it, before it is
    accumulated (what Megatron does for qk-layernorm weights and, at the end of the step,
    for weights marked ``sequence_parallel``); see ``_partial_gradient_params`` for which.
    Every other replicated weight already gets the full gradient: the collective that feeds
    its output to column-parallel linears (``Collectives.project`` / ``copy``) sums their
    input gradients.

    Correct under gradient accumulation and every ZeRO stage: the sum is linear, so summing
    each micro-batch's contribution equals summing the accumulated gradient, and DeepSpeed's
    own gradient hooks (reduction over dp, partitioning) run after accumulation, so they see
    the summed gradient. The tp ranks run the same backward graph, so their hooks issue the
    collectives in the same order.
    """
    if ctx.tp == 1:
        return
    for module in model.modules():
        if isinstance(module, MoTExpert):
            for param in _partial_gradient_params(module, ctx.sequence_parallel):
                if param.requires_grad:
                    param.register_hook(partial(_sum_over_tp, group=ctx.tp_group))


def _partial_gradient_params(expert: MoTExpert, sequence_parallel: bool) -> list[nn.Parameter]:
    """The replicated weights of ``expert`` whose gradient on one tp rank is a partial sum."""
    norms = [expert.q_norm, expert.k_norm]  # shared by all heads; each rank normalises its own heads
    if sequence_parallel:
        norms += [expert.input_layernorm, expert.post_attention_layernorm]  # see this rank's rows only
    params = [p for norm in norms for p in norm.parameters()]
    if expert.o_proj.bias is not None:
        params.append(expert.o_proj.bias)  # added on tp rank 0 only (TensorParallelRowLinear)
    return params


def _sum_over_tp(grad: Tensor, group: dist.ProcessGroup) -> Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad


def init_hooks(ctx: ParallelContext) -> dict[str, FullShapeFn | ShardFn]:
    """``full_shape`` / ``shard`` for ``model.init.init_weights``: draw in full, keep this rank's slice."""

    def full_shape(param: nn.Parameter) -> torch.Size:
        if not getattr(param, "tensor_model_parallel", False):
            return param.shape
        shape = list(param.shape)
        shape[param.partition_dim] *= ctx.tp
        return torch.Size(shape)

    def shard(param: nn.Parameter, full: Tensor) -> Tensor:
        # Basic slicing only, so the same hook cuts a lazy safetensors slice (convert.load_into)
        # and reads just this rank's part from disk.
        if not getattr(param, "tensor_model_parallel", False):
            return full[:]
        dim, size = param.partition_dim, param.shape[param.partition_dim]
        return full[(slice(None),) * dim + (slice(ctx.tp_rank * size, (ctx.tp_rank + 1) * size),)]

    return {"full_shape": full_shape, "shard": shard}


def gather_tensor_parallel(tensor: Tensor, param: nn.Parameter, ctx: ParallelContext) -> Tensor:
    """The full tensor of a parameter (or its gradient) from every tp rank's slice.

    ``param`` says how it is split; replicated tensors are returned as they are.
    """
    if ctx.tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.tp)]
    dist.all_gather(parts, tensor.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def cross_entropy_fn(ctx: ParallelContext) -> CrossEntropyFn:
    """Per-token CE for this layout's logits: serial at tp = 1, vocab-parallel above."""
    if ctx.tp == 1:
        return serial_cross_entropy
    return tensor_parallel_cross_entropy


def tensor_parallel_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token CE [N] in fp32 from vocab-sharded logits [N, V / tp] and global labels [N].

    Megatron's kernel subtracts the row max from its input in place, so it gets an fp32
    copy and the caller's logits stay intact.
    """
    return vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)
