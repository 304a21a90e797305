"""The collectives around the tensor-parallel linears (``model.layers.Collectives`` for tp > 1).

Shape legend: T tokens, R rows of the residual stream one rank holds, T_e an expert's
tokens, D model width.

The MoT layer runs each expert's linears on that expert's tokens only, so linears that
communicated themselves (Megatron's defaults) would make one collective per expert and per
projection: five all-reduces of the input gradients per layer (q, k, v, gate, up) and four
of the outputs. Here the linears make none (Megatron-core's "explicit expert
communication"): column-parallel linears leave their input gradient as this rank's partial
sum, row-parallel ones return this rank's partial sum, and the layer makes one collective
per block over both experts' tokens (plain TP's backward: one all-reduce per expert, the
same bytes; joining them would cost a [T, D] copy per block):

    ``TensorParallelCollectives``     forward            backward
        project (before q/k/v, gate/up)  -                  all-reduce (per expert)
        reduce  (after o, down)          all-reduce         -
    ``SequenceParallelCollectives``
        scatter (decoder input)          keep own rows      all-gather
        project                          all-gather         reduce-scatter
        reduce                           reduce-scatter     all-gather
        gather  (decoder output)         all-gather         keep own rows
    both: copy (LM head input)           -                  all-reduce

Sequence parallelism (Korthikanti et al. 2022; Megatron's ``sequence_parallel``) splits the
residual stream between blocks along the tokens: T is padded with zero rows to a multiple
of tp and each rank holds one contiguous run of R = T_pad / tp rows (``model.mot.ShardRows``),
so norms, residual adds and what they save for backward cost 1/tp, and a pipeline stage
sends each tp rank's rows to its peer. An all-gather + reduce-scatter moves the same bytes
as the all-reduce it replaces. The norm weights see this rank's rows only, so their
gradients are summed over tp (``tensor_parallel.apply_tensor_parallel``).

Memory: ``project`` gathers the normed rows into [T_pad, D] and hands each expert its
tokens ([T_e, D] copies) for its column-parallel linears, which save them for their weight
gradients. Those copies are freed as soon as the linears have run and rebuilt from this
rank's rows by a second all-gather in the backward, just before the linears need them
(``_Regathered``), as Megatron's sequence-parallel linears keep only their local input. It
works on storage, so it holds for any linear (Megatron's, Transformer Engine's, ZeRO-3's
patched one) and under activation recomputation, whose recomputed copies it frees and
rebuilds the same way.

CPU path: gloo has reduce-scatter since PyTorch 2.2, implemented inside PyTorch as an
all-reduce that keeps the local slice (twice the bytes of NCCL's real reduce-scatter;
correct, and only for CPU runs). The same calls run NCCL's collectives on GPUs.
Megatron-core's sequence-parallel mappings cannot serve here: they allocate their outputs
on ``torch.cuda.current_device()``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from torch import Tensor

from modus_mega.model.layers import Collectives
from modus_mega.model.mot import LayerContext
from modus_mega.parallel.context import ParallelContext

# torch 2.13 renamed the single-tensor collectives (the old names warn); GPU machines may run an older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TensorParallelCollectives(Collectives):
    """Tensor parallelism without sequence parallelism: every rank holds the whole residual stream."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def project(self, rows: list[Tensor], layer: LayerContext, fn: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
        return fn([self.copy(r) for r in rows])

    def reduce(self, partial: Tensor, layer: LayerContext) -> Tensor:
        return reduce_from_tensor_model_parallel_region(partial, group=self.group)

    def copy(self, x: Tensor) -> Tensor:
        return copy_to_tensor_model_parallel_region(x, group=self.group)


class SequenceParallelCollectives(TensorParallelCollectives):
    """Tensor parallelism with the residual stream split along tokens over the tp ranks (module docstring)."""

    def __init__(self, parallel: ParallelContext) -> None:
        super().__init__(parallel.tp_group)
        self.num_shards = parallel.tp
        self.shard = parallel.tp_rank

    # ------------------------------------------------------------------ the model's calls

    def scatter(self, hidden: Tensor) -> Tensor:
        size = -(-hidden.shape[0] // self.num_shards)
        return _OwnRows.apply(self._pad(hidden, size * self.num_shards), self)

    def gather(self, rows: Tensor, num_tokens: int) -> Tensor:
        return _AllGatherRows.apply(rows, self, False)[:num_tokens]

    def project(self, rows: list[Tensor], layer: LayerContext, fn: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
        shard = layer.shard
        padding = rows[0].new_zeros(shard.num_padding, rows[0].shape[1])
        local = torch.cat([*rows, padding])[shard.unpermute]  # [R, D] in row order
        full = _AllGatherRows.apply(local, self, True)  # [T_pad, D]; the linears' partial input gradients are summed
        tokens = [full.index_select(0, index) for index in layer.expert_index]  # per expert [T_e, D]
        outputs = fn(tokens)
        return list(_Regathered.apply(local, self, layer.expert_index, len(tokens), *tokens, *outputs))

    def reduce(self, partial: Tensor, layer: LayerContext) -> Tensor:
        return _ReduceScatterRows.apply(self._pad(partial, layer.shard.size * self.num_shards), self)

    # ------------------------------------------------------------------ collectives on [rows, D] (no autograd)

    def all_gather(self, rows: Tensor) -> Tensor:
        """Every rank's rows [R, D] -> [tp * R, D], in rank order."""
        full = rows.new_empty(rows.shape[0] * self.num_shards, *rows.shape[1:])
        _all_gather_single(full, rows.contiguous(), group=self.group)
        return full

    def reduce_scatter(self, full: Tensor) -> Tensor:
        """This rank's rows [R, D] of the sum over ranks of [tp * R, D]."""
        rows = full.new_empty(full.shape[0] // self.num_shards, *full.shape[1:])
        _reduce_scatter_single(rows, full.contiguous(), group=self.group)
        return rows

    def own_rows(self, full: Tensor) -> Tensor:
        """This rank's rows [R, D] of [tp * R, D] (a copy)."""
        size = full.shape[0] // self.num_shards
        return full[self.shard * size : (self.shard + 1) * size].clone()

    @staticmethod
    def _pad(x: Tensor, num_rows: int) -> Tensor:
        """x [n, D] with zero rows appended up to [num_rows, D]."""
        return F.pad(x, (0, 0, 0, num_rows - x.shape[0]))


class _OwnRows(torch.autograd.Function):
    """Forward: this rank's rows of a tensor every rank holds whole; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx: Any, full: Tensor, comm: SequenceParallelCollectives) -> Tensor:
        ctx.comm = comm
        return comm.own_rows(full)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.comm.all_gather(grad), None


class _AllGatherRows(torch.autograd.Function):
    """Forward: all-gather the ranks' rows; backward: reduce-scatter the gradient (``sum_grad``: each
    rank's is a partial sum) or keep this rank's rows of it (it is the same on every rank)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, comm: SequenceParallelCollectives, sum_grad: bool) -> Tensor:
        ctx.comm, ctx.sum_grad = comm, sum_grad
        return comm.all_gather(rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return (ctx.comm.reduce_scatter(grad) if ctx.sum_grad else ctx.comm.own_rows(grad)), None, None


class _ReduceScatterRows(torch.autograd.Function):
    """Forward: this rank's rows of the sum of the ranks' partial sums; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx: Any, partial: Tensor, comm: SequenceParallelCollectives) -> Tensor:
        ctx.comm = comm
        return comm.reduce_scatter(partial)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.comm.all_gather(grad), None


class _Regathered(torch.autograd.Function):
    """The identity on ``outputs``; frees ``tokens`` (gathered copies the linears saved) and rebuilds them in backward.

    Called as ``apply(rows, comm, expert_index, num_tokens, *tokens, *outputs)`` where
    ``tokens[e] = all_gather(rows)[expert_index[e]]`` and ``outputs`` were computed from
    ``tokens``. Its backward runs before the backward of anything that computed ``outputs``
    (it consumes them), so the rebuilt tokens are in place when those read them. Freeing
    keeps each tensor's metadata and version, so autograd's saved-tensor checks still pass.
    """

    @staticmethod
    def forward(
        ctx: Any, rows: Tensor, comm: SequenceParallelCollectives, expert_index: list[Tensor], num_tokens: int, *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        tokens, outputs = tensors[:num_tokens], tensors[num_tokens:]
        ctx.save_for_backward(rows, *tokens)
        ctx.comm, ctx.expert_index = comm, expert_index
        ctx.set_materialize_grads(False)
        for t in tokens:
            assert t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size(), (
                "a gathered token tensor must own its storage (index_select's output does)"
            )
            t.untyped_storage().resize_(0)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        rows, *tokens = ctx.saved_tensors
        full = ctx.comm.all_gather(rows)
        for t, index in zip(tokens, ctx.expert_index):
            storage = t.untyped_storage()
            storage.resize_(t.numel() * t.element_size())
            alias = t.new_empty(0).set_(storage, 0, t.shape, t.stride())  # writes without bumping t's version
            torch.index_select(full, 0, index, out=alias)
        return (None, None, None, None, *(None for _ in tokens), *grads)
