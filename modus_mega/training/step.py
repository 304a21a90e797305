"""One training step behind one interface: ``TrainStep(micro_batches, global_counts) -> loss sums``.

The same seam evaluates: ``evaluate(micro_batches, global_counts)`` runs the forward and
the same ``StepLoss`` without gradient, update or non-finite verdict (the validation loss,
``training/validation.py``), through DeepSpeed's ``eval_batch`` at pp > 1.

The loop hands a step this rank's prepared micro-batches and the global batch's target
counts and gets back this dp rank's ``loss_sums`` [NUM_LOSS_SUMS] float64 on the CPU,
summed over its micro-batches; forward, loss, backward, clipping and the optimizer step
happen inside. ``training/engine.py`` picks the implementation once, from the layout:

- ``EagerStep`` (pp = 1): each micro-batch through the DeepSpeed engine's forward and
  backward; at the accumulation boundary our clipping (where DeepSpeed's keeps no norm)
  and DeepSpeed's step.
- ``PipelineStep`` (pp > 1): DeepSpeed's pipeline engine runs the whole step
  (``train_batch``) through the stages; the last stage runs the same ``StepLoss``; our
  clipping, where needed, is a pre-step hook of the optimizer (``GradClipper``); the sums
  are broadcast from the last stage so every stage returns them.

Written once here for both: the loss of a micro-batch (``StepLoss``: ``modus_loss`` over
the global counts, seen by the non-finite guard, scaled for DeepSpeed), the cast of the
inputs to the compute dtype (``ModelInputs.in_compute_dtype``, on a copy), and the context
the forward runs in (``autocast``: Transformer Engine's FP8 autocast on the ``te`` backend,
``parallel/fp8.py``; the pipeline engine runs its forwards inside ``train_batch``, so there
it encloses the whole step).

Loss scaling contract with DeepSpeed: the loss is a SUM over this rank's target tokens
divided by the GLOBAL target-token count (``modus_mega/losses.py``), so the gradient the
step needs is the SUM over micro-batches and data-parallel ranks. DeepSpeed averages over
dp, which ``loss_scale`` undoes (times dp); at pp = 1 its division by the accumulation
steps is switched off (``scale_wrt_gas=False``), while the pipeline engine always divides,
so there the scale is also times ``grad_accum_steps``.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Protocol

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import clip_grad_norm_
from torch import Tensor

from modus_mega.config import ModusConfig, TrainingConfig
from modus_mega.losses import NUM_LOSS_SUMS, CrossEntropyFn, LossTargets, loss_sums, modus_loss
from modus_mega.model.inputs import StepInputs
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.pipeline import GradClipper, stage_micro_batch
from modus_mega.training.failures import NonFiniteGuard


class TrainStep(Protocol):
    """Forward, backward and optimizer step over one step's micro-batches (see the module docstring)."""

    compute_dtype: torch.dtype  # what the step's inputs are cast to (bf16 on GPU, fp32 on CPU)

    def __call__(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> Tensor:
        """This dp rank's loss sums [NUM_LOSS_SUMS] float64 on the CPU; ``global_counts``: (CE, MSE) target tokens."""
        ...

    def evaluate(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> Tensor:
        """The same loss sums over any number of micro-batches, without gradient, update or non-finite verdict."""
        ...

    def grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step, before clipping (NaN when it was not computed)."""
        ...


def loss_scale(cfg: ModusConfig, ctx: ParallelContext) -> float:
    """What the loss is multiplied by so that DeepSpeed's gradient is the step's sum (module docstring)."""
    return float(ctx.dp * (cfg.training.grad_accum_steps if ctx.pp > 1 else 1))


class StepLoss:
    """The loss of one micro-batch (a ``MicroBatchLoss``), and the record of its sums for the step's log.

    Returns ``modus_loss`` times ``scale``; the unscaled loss passes the non-finite guard.
    ``begin_step`` sets the step's global target counts and forgets the last step's sums;
    ``training=False`` (an evaluation) returns the unscaled loss and tells the guard nothing.
    """

    def __init__(self, cfg: TrainingConfig, cross_entropy: CrossEntropyFn, scale: float, guard: NonFiniteGuard) -> None:
        self.ce_weight, self.mse_weight = cfg.ce_weight, cfg.mse_weight
        self.cross_entropy = cross_entropy
        self.scale = scale
        self.guard = guard
        self.global_counts = (0, 0)  # (CE, MSE) target tokens of the whole global batch
        self.sums: list[Tensor] = []  # per micro-batch: loss_sums [NUM_LOSS_SUMS] float64, on the device
        self.training = True  # False while evaluating: no scale, no verdict

    def begin_step(self, global_counts: tuple[int, int], training: bool = True) -> None:
        """Set the step's global target counts; forget the previous step's sums."""
        self.global_counts = global_counts
        self.sums = []
        self.training = training

    def __call__(self, logits: Tensor, velocity: Tensor, targets: LossTargets) -> Tensor:
        weights = (self.ce_weight, self.mse_weight)
        terms = modus_loss(logits, velocity, targets, *self.global_counts, *weights, cross_entropy=self.cross_entropy)
        self.sums.append(loss_sums(terms))
        if not self.training:
            return terms.loss
        self.guard.observe_loss(terms.loss)
        return terms.loss * self.scale

    def step_sums(self, device: torch.device) -> Tensor:
        """The step's sums so far [NUM_LOSS_SUMS] float64 on ``device`` (zeros on a stage without a loss)."""
        total = torch.zeros(NUM_LOSS_SUMS, dtype=torch.float64, device=device)
        for sums in self.sums:
            total += sums
        return total


class EagerStep:
    """pp = 1: each micro-batch's forward and backward through the DeepSpeed engine, then its step.

    ``own_clip``: the max gradient norm when we clip (fp32 without ZeRO, where DeepSpeed's
    clipping keeps no norm; inf: measure only), None when DeepSpeed clips and reports the norm.
    """

    def __init__(
        self,
        engine: deepspeed.DeepSpeedEngine,
        loss: StepLoss,
        compute_dtype: torch.dtype,
        own_clip: float | None,
        mpu: Any,  # ParallelContext.deepspeed_mpu(): counts tp shards once in the norm
        autocast: Callable[[], AbstractContextManager] = nullcontext,  # a fresh context for each forward
    ) -> None:
        self.engine = engine
        self.loss = loss
        self.compute_dtype = compute_dtype
        self.own_clip = own_clip
        self.mpu = mpu
        self.autocast = autocast
        self._grad_norm = math.nan

    def __call__(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> Tensor:
        self.loss.begin_step(global_counts)
        for micro in micro_batches:
            with self.autocast():
                logits, velocity = self._forward(micro)
            loss = self.loss(logits, velocity, micro.targets)
            del logits, velocity  # not alive through the next micro-batch's forward
            self.engine.backward(loss, scale_wrt_gas=False)
            if self.own_clip is not None and self.engine.is_gradient_accumulation_boundary():
                params = self.engine.module.parameters()
                self._grad_norm = float(clip_grad_norm_(params, self.own_clip, mpu=self.mpu))
            self.engine.step()
        return self.loss.step_sums(self.engine.device).cpu()

    @torch.no_grad()
    def evaluate(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> Tensor:
        self.loss.begin_step(global_counts, training=False)
        for micro in micro_batches:
            logits, velocity = self._forward(micro)
            self.loss(logits, velocity, micro.targets)
        return self.loss.step_sums(self.engine.device).cpu()

    def _forward(self, micro: StepInputs) -> tuple[Tensor, Tensor]:
        """The heads' outputs (logits [N_ce, V/tp], velocity [N_mse, P]) at the targets' positions."""
        targets = micro.targets
        return self.engine(micro.model.in_compute_dtype(self.compute_dtype), targets.ce_index, targets.mse_index)

    def grad_norm(self) -> float:
        if self.own_clip is not None:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)


class PipelineStep:
    """pp > 1: one optimizer step through DeepSpeed's pipeline engine (``train_batch``).

    ``loss`` is the ``StepLoss`` the pipeline's last stage was built with. ``own_clip`` as
    for ``EagerStep``; our clipping is then a pre-step hook of ``optimizer`` (DeepSpeed runs
    the whole step), registered here, after the non-finite gate's.
    """

    def __init__(
        self,
        engine: PipelineEngine,
        loss: StepLoss,
        compute_dtype: torch.dtype,
        own_clip: float | None,
        optimizer: torch.optim.Optimizer,
        ctx: ParallelContext,
        autocast: Callable[[], AbstractContextManager] = nullcontext,  # a fresh context for each step
    ) -> None:
        self.engine = engine
        self.loss = loss
        self.compute_dtype = compute_dtype
        self.ctx = ctx
        self.autocast = autocast
        self.clipper: GradClipper | None = None
        if own_clip is not None:
            self.clipper = GradClipper([p for group in optimizer.param_groups for p in group["params"]], own_clip, ctx)
            optimizer.register_step_pre_hook(self.clipper)
        # The global rank of this pipeline's last stage (ranks: tp fastest, then dp, then pp).
        self._last_stage_rank = ctx.rank + (ctx.pp - 1 - ctx.pp_rank) * ctx.tp * ctx.dp
        self._num_tokens: int | None = None

    def __call__(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> Tensor:
        self._check_shapes(micro_batches)
        self.loss.begin_step(global_counts)
        loaded = [stage_micro_batch(self._in_compute_dtype(micro)) for micro in micro_batches]
        with self.autocast():
            self.engine.train_batch(iter(loaded))
        return self._last_stage_sums()

    def evaluate(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> Tensor:
        self.loss.begin_step(global_counts, training=False)
        loaded = [stage_micro_batch(self._in_compute_dtype(micro)) for micro in micro_batches]
        # Our sums, not DeepSpeed's dp-averaged output: no reduction, no broadcast of it.
        with self.autocast():
            self.engine.eval_batch(iter(loaded), reduce_output=None, bcast_loss=False, num_micro_batches=len(loaded))
        return self._last_stage_sums()

    def _last_stage_sums(self) -> Tensor:
        """The loss's sums [NUM_LOSS_SUMS] float64 on the CPU, computed on the last stage, broadcast over pp."""
        sums = self.loss.step_sums(self.ctx.device)
        dist.broadcast(sums, src=self._last_stage_rank, group=self.ctx.pp_group)
        return sums.cpu()

    def grad_norm(self) -> float:
        if self.clipper is not None:
            return self.clipper.last_norm
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def _in_compute_dtype(self, micro: StepInputs) -> StepInputs:
        return replace(micro, model=micro.model.in_compute_dtype(self.compute_dtype))

    def _check_shapes(self, micro_batches: list[StepInputs]) -> None:
        """Raise ``ValueError`` unless there are ``grad_accum_steps`` micro-batches of one fixed token count."""
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(
                f"got {len(micro_batches)} micro-batches for a step of training.grad_accum_steps="
                f"{self.engine.gradient_accumulation_steps()}"
            )
        for micro in micro_batches:
            num_tokens = micro.model.token_type.numel()
            if self._num_tokens is None:
                self._num_tokens = num_tokens
            if num_tokens != self._num_tokens:
                raise ValueError(
                    f"a micro-batch of {num_tokens} tokens after one of {self._num_tokens}: pipeline stages exchange "
                    "fixed shapes; pack every micro-batch to data.token_budget"
                )

