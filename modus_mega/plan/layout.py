"""One candidate parallel layout: the knobs the planner turns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Recompute = Literal["none", "full"]
EmaPlacement = Literal["sharded", "replicated", "none"]


@dataclass(frozen=True)
class Layout:
    """Degrees, ZeRO stage, activation policy and batch shape of one training layout.

    Rank order is Megatron's and DeepSpeed's: tp fastest, then dp, then pp
    (``modus_mega/parallel/context.py``), so a tp group is ``tp`` consecutive ranks on one
    node and a dp group spans ``tp * dp`` consecutive ranks.
    """

    tp: int  # tensor-parallel degree (inside a node)
    pp: int  # pipeline stages
    dp: int  # data-parallel degree = gpus / (tp * pp)
    zero_stage: int  # DeepSpeed ZeRO stage 0-3 (2 and 3 only with pp = 1)
    sequence_parallel: bool  # Megatron sequence parallelism: norms and residuals split over tp
    recompute: Recompute  # "full": keep only each layer's input, recompute the layer in backward
    token_budget: int  # tokens per packed micro-batch (data.token_budget)
    grad_accum: int  # micro-batches per optimizer step and dp rank (training.grad_accum_steps; pipeline micro-batches)

    @property
    def gpus(self) -> int:
        """GPUs the layout occupies."""
        return self.tp * self.pp * self.dp

    @property
    def global_batch_tokens(self) -> int:
        """Tokens (padding included) of one optimizer step over all dp ranks."""
        return self.dp * self.token_budget * self.grad_accum

    def describe(self) -> str:
        """A compact one-line name, e.g. ``tp4 pp1 dp64 z1 sp full T32768 ga2``."""
        sp = " sp" if self.sequence_parallel else ""
        return (
            f"tp{self.tp} pp{self.pp} dp{self.dp} z{self.zero_stage}{sp} {self.recompute} "
            f"T{self.token_budget} ga{self.grad_accum}"
        )
