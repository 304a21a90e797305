"""Non-finite steps: detect a NaN/Inf loss or gradient, skip the update, stop after K in a row.

Detection is local and cheap, the decision global:

- every micro-batch loss passes ``NonFiniteGuard.observe_loss`` (in ``StepLoss``,
  ``training/step.py``: at pp > 1 it runs on the last stage, the only stage with a loss);
- a hook on every trainable parameter checks each gradient contribution as autograd
  produces it, before DeepSpeed reduces or partitions it. A reduced gradient (a sum over
  micro-batches and data-parallel ranks) is non-finite exactly when one of its
  contributions is, so the global gradient norm is non-finite exactly when a hook saw a
  NaN/Inf on some rank (barring an overflow of finite values in the norm itself);
- at the accumulation boundary, inside the optimizer step, ``verdict`` all-reduces one
  flag pair per rank over the whole world, so every rank takes the same decision and knows
  which ranks saw what.

The verdict is taken by ``StepGate``, a pre-step hook of our optimizer, because with pp > 1
DeepSpeed's pipeline engine runs the whole step (``train_batch``) and our code never sees
the boundary; one mechanism serves both paths. DeepSpeed calls our optimizer's ``step`` on
every rank at every boundary (its ZeRO 1/2 wrapper once per parameter group, from a loop
every rank runs), so the collective in the hook cannot diverge. The one exception:
DeepSpeed's ZeRO and bf16 optimizers skip the step on their own, without calling ours,
when their gradient norm is non-finite (fp32 ZeRO 1/2 always does; with bf16, whether
DeepSpeed's optimizer for the stage checks depends on the stage and its config). That norm
is all-reduced over every rank, so then no rank ran the hook, and ``StepGate.end_step``
takes the verdict after the step instead.

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

    skip_next_step: bool = False  # set by ``StepGate`` when the step's loss or gradient is non-finite

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """AdamW's step, or nothing when ``skip_next_step`` is set."""
        if self.skip_next_step:
            return None
        # Not super().step(): once any plain AdamW exists, torch has wrapped AdamW.step with the
        # hook runner too, and our pre-step hooks (the gate, the clipper) would run twice.
        parent_step = torch.optim.AdamW.step
        return (parent_step.__wrapped__ if getattr(parent_step, "hooked", False) else parent_step)(self, closure)


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

    def __init__(self, device: torch.device) -> None:
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        self._handles: list = []

    def watch(self, params: Iterable[nn.Parameter]) -> None:
        """Check every gradient contribution of the trainable ``params`` from now on.

        Separate from construction: the loss that reports to the guard is made before the
        model (a pipeline is built with its loss), the hooks once the model exists.
        """
        self._handles += [p.register_hook(self._check_grad) for p in params if p.requires_grad]

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


class StepGate:
    """Applies or cancels each optimizer step on the guard's verdict, from inside the step.

    Registered as a pre-step hook of ``optimizer`` (see the module docstring for why there):
    the verdict is taken once per step, however often DeepSpeed calls the optimizer. Call
    ``end_step`` after every optimizer step, on every rank.
    """

    def __init__(self, guard: NonFiniteGuard, optimizer: SkippableAdamW) -> None:
        self.guard = guard
        self.optimizer = optimizer
        self._health: StepHealth | None = None  # this step's verdict, once taken
        optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._health is None:
            self._health = self.guard.verdict()
        self.optimizer.skip_next_step = not self._health.ok

    def end_step(self) -> StepHealth:
        """The health of the optimizer step just run; the verdict is taken now if DeepSpeed skipped our step."""
        health = self._health if self._health is not None else self.guard.verdict()
        self._health = None
        self.optimizer.skip_next_step = False
        return health


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
