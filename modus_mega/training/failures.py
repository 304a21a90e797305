"""Non-finite steps: detect a NaN/Inf loss or gradient, skip the update, stop after K in a row.

Detection is local and cheap, the decision global:

- every micro-batch loss passes ``NonFiniteGuard.observe_loss``;
- a hook on every trainable parameter checks each gradient contribution as autograd
  produces it, before DeepSpeed reduces or partitions it. A reduced gradient (a sum over
  micro-batches and data-parallel ranks) is non-finite exactly when one of its
  contributions is, so the global gradient norm is non-finite exactly when a hook saw a
  NaN/Inf on some rank (barring an overflow of finite values in the norm itself);
- at the accumulation boundary, before the optimizer step, ``verdict`` all-reduces one
  flag pair per rank over the whole world, so every rank takes the same decision and knows
  which ranks saw what.

A bad step is skipped through ``SkippableAdamW``: DeepSpeed runs its step as usual
(gradient reduction, clipping, zeroing, its counters), but our optimizer leaves the fp32
master weights and the Adam moments untouched, so the weights DeepSpeed copies back are
the old ones. The EMA is not updated on a skipped step. ``BadStepCounter`` counts skipped
steps (``skipped_steps`` in the log) and raises ``NonFiniteTrainingError`` after
``training.max_bad_steps`` in a row (the loop logs the step first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


class SkippableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose next step can be cancelled (weights and moments stay as they are)."""

    skip_next_step: bool = False  # set by the training engine when the step's loss or gradient is non-finite

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """AdamW's step, or nothing when ``skip_next_step`` is set."""
        if self.skip_next_step:
            return None
        return super().step(closure)


@dataclass(frozen=True)
class StepHealth:
    """What the ranks saw in one optimizer step's losses and gradients."""

    nonfinite_loss_ranks: tuple[int, ...] = ()  # ranks with a NaN/Inf micro-batch loss
    nonfinite_grad_ranks: tuple[int, ...] = ()  # ranks with a NaN/Inf gradient contribution

    @property
    def ok(self) -> bool:
        """Whether the optimizer step may be applied."""
        return not (self.nonfinite_loss_ranks or self.nonfinite_grad_ranks)

    def describe(self) -> str:
        """A short account, e.g. ``non-finite loss on ranks [1]; non-finite gradient on ranks [0, 1]``."""
        parts = [
            f"non-finite {what} on ranks {list(ranks)}"
            for what, ranks in (("loss", self.nonfinite_loss_ranks), ("gradient", self.nonfinite_grad_ranks))
            if ranks
        ]
        return "; ".join(parts) or "finite"


class NonFiniteGuard:
    """Watches losses and gradient contributions for NaN/Inf; ``verdict`` agrees on them over all ranks.

    The flags stay on the device (no synchronisation per micro-batch or per parameter);
    ``verdict`` reads them once per optimizer step.
    """

    def __init__(self, params: Iterable[nn.Parameter], device: torch.device) -> None:
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._handles = [p.register_hook(self._check_grad) for p in params if p.requires_grad]

    def _check_grad(self, grad: Tensor) -> None:
        # A sum is non-finite iff an element is (finite gradients never sum past 3e38), and it
        # needs no full-size temporary, unlike isfinite(grad).all().
        self._grad_bad.logical_or_(~torch.isfinite(grad.sum()))

    def observe_loss(self, loss: Tensor) -> None:
        """Record whether one micro-batch's loss is finite."""
        self._loss_bad.logical_or_(~torch.isfinite(loss.detach()).all())

    def verdict(self) -> StepHealth:
        """Which ranks saw a non-finite loss or gradient since the last verdict (collective over all ranks)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        flags = torch.zeros(2, world, dtype=torch.int32, device=self._loss_bad.device)  # [loss/grad, rank]
        flags[0, rank] = self._loss_bad.int()
        flags[1, rank] = self._grad_bad.int()
        if world > 1:
            dist.all_reduce(flags)
        self._loss_bad.zero_()
        self._grad_bad.zero_()
        loss_ranks, grad_ranks = (tuple(torch.nonzero(row).flatten().tolist()) for row in flags.cpu())
        return StepHealth(loss_ranks, grad_ranks)

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NonFiniteTrainingError(RuntimeError):
    """Raised after ``training.max_bad_steps`` non-finite steps in a row."""


@dataclass
class BadStepCounter:
    """Counts skipped steps and stops the run after ``max_bad_steps`` in a row (state kept in checkpoints)."""

    max_bad_steps: int  # training.max_bad_steps
    skipped_steps: int = 0  # steps skipped since the run began (resumed runs included)
    bad_in_a_row: int = 0  # the current run of consecutive skipped steps

    def record(self, health: StepHealth) -> None:
        """Count one optimizer step's outcome."""
        if health.ok:
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1

    def check(self, step: int, health: StepHealth) -> None:
        """Raise ``NonFiniteTrainingError`` when ``step`` (just recorded) made the streak reach the limit."""
        if self.bad_in_a_row >= self.max_bad_steps:
            first = step - self.bad_in_a_row + 1
            raise NonFiniteTrainingError(
                f"step {step}: {health.describe()}. Steps {first}..{step} ({self.bad_in_a_row} in a row, "
                f"training.max_bad_steps={self.max_bad_steps}) were all non-finite and skipped, so training stops "
                f"({self.skipped_steps} skipped in all). Lower training.optim.lr or raise warmup, check the data "
                "these steps read, or resume from an earlier checkpoint."
            )
