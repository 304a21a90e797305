"""Build a training run for a parallel layout: the model, DeepSpeed's engine and the training step.

``build_engine`` is the one place that builds a run, in this order: the model by
``parallel/build.py``'s ordered list (the whole model at pp = 1, this rank's pipeline stage
at pp > 1, whose last stage is given the step's loss), the frozen VAE, the start from
BAGEL (``convert/run_init.py``, before DeepSpeed copies the weights into its partitions),
``deepspeed.initialize`` with our AdamW (skippable: ``training/failures.py``) and a
DeepSpeed config generated from ours (``deepspeed_config``: one source of truth, never a
hand-written JSON), the training step for the layout (``training/step.py``: the one place
that picks eager or pipeline) with the compute dtype of ``training.precision``
(``parallel/fp8.py``'s ``compute_dtype``, decided here once: the inputs' cast, DeepSpeed's
bf16 switch and who clips follow from it) and the forward's FP8 context, and last the EMA
(``parallel/ema.py``) over the optimizer's fp32 partition of the weights. The result,
``TrainEngine``, is the same object at every layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import deepspeed
import torch

from modus_mega.config import ModusConfig
from modus_mega.convert.run_init import init_from_bagel
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.inputs import StepInputs
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.build import build_model, build_vae
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.ema import EmaWeights
from modus_mega.parallel.fp8 import compute_dtype, float8_autocast
from modus_mega.parallel.pipeline import ModusPipeline
from modus_mega.parallel.tensor_parallel import cross_entropy_fn
from modus_mega.training.failures import NonFiniteGuard, SkippableAdamW, StepGate, StepHealth
from modus_mega.training.step import EagerStep, PipelineStep, StepLoss, TrainStep, loss_scale


def deepspeed_config(cfg: ModusConfig, ctx: ParallelContext) -> dict[str, Any]:
    """DeepSpeed's config, generated from ours.

    One DeepSpeed "sample" is one packed micro-batch of ``data.token_budget`` tokens; the
    learning rate is set by our schedule each step, so no DeepSpeed scheduler is configured.
    Where DeepSpeed would clip without reporting the norm (fp32 without ZeRO), clipping is
    ours (``training/step.py``) and DeepSpeed's is off.
    """
    accum = cfg.training.grad_accum_steps
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accum,
        "train_batch_size": accum * ctx.dp,
        "gradient_clipping": 0.0 if _clips_itself(cfg, ctx) else cfg.training.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        # Read by the pipeline engine only (pp > 1): each tp rank sends its own hidden states (the whole
        # sequence, or its rows under sequence parallelism), since DeepSpeed's partitioned sends assume
        # Megatron-GPT's activation tuple.
        "pipeline": {"pipe_partitioned": False, "grad_partitioned": False},
        "zero_allow_untested_optimizer": True,  # our torch.optim.AdamW
        "bf16": {"enabled": _compute_dtype(cfg, ctx) == torch.bfloat16},  # DeepSpeed keeps fp32 master weights
        "steps_per_print": 1 << 30,  # the training loop logs
        "wall_clock_breakdown": False,
    }


def _clips_itself(cfg: ModusConfig, ctx: ParallelContext) -> bool:
    """Whether our step clips (fp32 without ZeRO: DeepSpeed's clip there keeps no norm)."""
    return cfg.parallel.zero_stage == 0 and _compute_dtype(cfg, ctx) == torch.float32


def _compute_dtype(cfg: ModusConfig, ctx: ParallelContext) -> torch.dtype:
    """The dtype the model computes in on this run's device (``training.precision``, ``parallel/fp8.py``)."""
    return compute_dtype(cfg.training.precision, ctx.device)


@dataclass
class TrainEngine:
    """A built run: DeepSpeed's engine, our optimizer, the VAE, the step, the non-finite gate and the EMA.

    The same at every layout: ``train_step`` runs whichever ``TrainStep`` the layout needs.
    """

    engine: deepspeed.DeepSpeedEngine  # DeepSpeed's (its pipeline engine when pp > 1): saves and loads checkpoints
    optimizer: SkippableAdamW  # ours; DeepSpeed (or its ZeRO wrapper) steps it
    vae: FluxAutoEncoder
    step: TrainStep  # forward, loss, backward, clipping and the optimizer step of one step
    gate: StepGate  # skips an optimizer step whose loss or gradient is non-finite on any rank
    ema: EmaWeights | None = None  # training.ema_decay > 0: averaged after every applied optimizer step
    last_health: StepHealth = field(default_factory=StepHealth, init=False)  # of the last optimizer step

    @property
    def model(self) -> ModusModel | ModusPipeline:
        """The wrapped model (this rank's shard; its pipeline, holding this rank's stage, when pp > 1)."""
        return self.engine.module

    def train_step(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; this dp rank's loss sums [NUM_LOSS_SUMS] float64.

        ``global_counts``: the (CE, MSE) target tokens of the whole global batch. A step whose
        loss or gradient is non-finite on any rank is skipped (``last_health`` says where);
        an applied step updates the EMA.
        """
        sums = self.step(micro_batches, global_counts)
        self.last_health = self.gate.end_step()
        if self.ema is not None and self.last_health.ok:
            self.ema.update()
        return sums

    @torch.no_grad()
    def evaluate(self, micro_batches: list[StepInputs], global_counts: tuple[int, int]) -> torch.Tensor:
        """This dp rank's loss sums [NUM_LOSS_SUMS] float64 of ``micro_batches``, without gradient or update.

        The validation loss (``training/validation.py``): the training objective's sums,
        normalised by ``global_counts`` (the held-out set's (CE, MSE) target tokens).
        """
        return self.step.evaluate(micro_batches, global_counts)

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group for the next optimizer step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step, before clipping (NaN when it was not computed)."""
        return self.step.grad_norm()


def build_engine(cfg: ModusConfig, ctx: ParallelContext) -> TrainEngine:
    """Build the run for ``cfg``'s layout: model, start from BAGEL, DeepSpeed, step, EMA (module docstring)."""
    guard = NonFiniteGuard(ctx.device)
    loss = StepLoss(cfg.training, cross_entropy_fn(ctx), loss_scale(cfg, ctx), guard)
    model = build_model(cfg, ctx, loss_fn=loss)
    vae = build_vae(cfg, ctx)
    init_from_bagel(model, vae, cfg, ctx)  # a fresh run with init.bagel_dir starts from BAGEL's weights
    optim = cfg.training.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SkippableAdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    mpu = ctx.deepspeed_mpu()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        config=deepspeed_config(cfg, ctx),
        mpu=None if ctx.pp > 1 else mpu,  # a PipelineModule brings DeepSpeed's grid over the same groups
        dist_init_required=False,
    )
    guard.watch(params)
    gate = StepGate(guard, optimizer)  # the first pre-step hook: the verdict precedes the pipeline's clipping
    own_clip = (optim.grad_clip or math.inf) if _clips_itself(cfg, ctx) else None
    dtype = _compute_dtype(cfg, ctx)
    autocast = partial(float8_autocast, cfg.training, cfg.parallel.tp_backend, ctx)  # TE's FP8 (te backend) or nothing
    step: TrainStep
    if ctx.pp > 1:
        step = PipelineStep(engine, loss, dtype, own_clip, optimizer, ctx, autocast)
    else:
        step = EagerStep(engine, loss, dtype, own_clip, mpu, autocast)
    return TrainEngine(
        engine=engine,
        optimizer=optimizer,
        vae=vae,
        step=step,
        gate=gate,
        ema=EmaWeights(engine.module, cfg.training.ema_decay) if cfg.training.ema_decay > 0 else None,
    )
