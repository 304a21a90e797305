"""The one object that holds the parallel layout: degrees, ranks and process groups.

``ParallelContext.initialize`` starts ``torch.distributed`` (gloo on CPU, NCCL on GPU,
chosen once here), builds Megatron-core's ``parallel_state`` groups exactly once, and
hands everything to callers explicitly (STYLE 7): nothing else in the project reads
``parallel_state`` globals except Megatron's own layers and cross-entropy, which need them.

Rank order is Megatron's and DeepSpeed's alike: tp fastest, then dp, then pp. So rank
``r`` has ``tp_rank = r % tp``, ``dp_rank = (r // tp) % dp``, ``pp_rank = r // (tp * dp)``.

Launch modes, all through the same code: ``deepspeed`` / ``torchrun`` set ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; a plain ``python`` run sets none of
them and gets a one-process group on an in-memory store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from modus_mega.config import ParallelConfig


@dataclass
class ParallelContext:
    """Degrees, this process's coordinates and the process groups of one run."""

    world_size: int
    rank: int  # global rank
    local_rank: int  # rank on this node (picks the GPU)
    tp: int  # tensor-parallel degree
    pp: int  # pipeline-parallel degree
    dp: int  # data-parallel degree (world_size / (tp * pp))
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    device: torch.device  # where this rank computes
    backend: str  # "gloo" or "nccl"
    sequence_parallel: bool = False  # parallel.sequence_parallel: the residual stream split along tokens over tp

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def initialize(cls, cfg: ParallelConfig) -> "ParallelContext":
        """Start the process group and Megatron's groups for the layout in ``cfg``.

        Raises ``ValueError`` when the world size is not a multiple of tp * pp.
        """
        use_cuda = torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        timeout = timedelta(seconds=cfg.collective_timeout_s)
        if "WORLD_SIZE" in os.environ:
            world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        else:
            world_size, rank, local_rank = 1, 0, 0
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it even for one process
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)

        if world_size % (cfg.tp * cfg.pp):
            raise ValueError(
                f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = {cfg.tp} * {cfg.pp}; "
                f"launch a multiple of {cfg.tp * cfg.pp} processes or change the layout"
            )
        if not dist.is_initialized():
            if "WORLD_SIZE" in os.environ:
                dist.init_process_group(backend, timeout=timeout, device_id=device if use_cuda else None)
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            distributed_timeout_minutes=max(1, cfg.collective_timeout_s // 60),
            create_gloo_process_groups=False,
        )
        ctx = cls(
            world_size=world_size,
            rank=rank,
            local_rank=local_rank,
            tp=cfg.tp,
            pp=cfg.pp,
            dp=world_size // (cfg.tp * cfg.pp),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            pp_group=parallel_state.get_pipeline_model_parallel_group(),
            dp_group=parallel_state.get_data_parallel_group(),
            device=device,
            backend=backend,
            sequence_parallel=cfg.sequence_parallel,
        )
        assert (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank) == (
            rank % ctx.tp,
            (rank // ctx.tp) % ctx.dp,
            rank // (ctx.tp * ctx.dp),
        ), "Megatron's rank order is no longer tp-dp-pp; DeepSpeed's pipeline topology assumes it"
        return ctx

    def close(self) -> None:
        """Destroy Megatron's groups and the process group (the end of a run)."""
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the shared outputs (logs, plots, the ``latest`` pointer)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def all_reduce_dp(self, values: list[float]) -> list[float]:
        """Sum ``values`` over the data-parallel group (e.g. global target-token counts)."""
        if self.dp == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (e.g. a caught SIGTERM)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def deepspeed_mpu(self) -> "DeepSpeedMPU":
        """The ``mpu`` object DeepSpeed asks for: our tp and dp groups."""
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """The model-parallel-unit interface DeepSpeed queries (``deepspeed.initialize(mpu=...)``).

    DeepSpeed reduces gradients over the data-parallel group and counts tensor-parallel
    shards once in the global gradient norm; "model parallel" means tp here because
    pipeline stages are DeepSpeed's own topology.
    """

    def __init__(self, ctx: ParallelContext) -> None:
        self._ctx = ctx

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ctx.tp_group

    def get_model_parallel_rank(self) -> int:
        return self._ctx.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._ctx.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self._ctx.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ctx.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ctx.rank - self._ctx.tp_rank

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._ctx.dp_group

    def get_data_parallel_rank(self) -> int:
        return self._ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._ctx.dp
