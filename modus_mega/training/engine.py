"""Build the trainable model for a parallel layout and wrap it in a DeepSpeed engine.

The order is fixed (STYLE 1, 3): build the model with this layout's linear layers,
apply tensor parallelism, initialise every parameter by name (layout-invariant), apply
activation recomputation (``parallel/recompute.py``), move to the device, then
``deepspeed.initialize`` with our AdamW (skippable: ``training/failures.py``) and a
DeepSpeed config generated from ours (``deepspeed_config``: one source of truth, never a
hand-written JSON). The EMA (``training/ema.py``) is built last, over the optimizer's
fp32 partition of the weights.

Loss scaling contract with DeepSpeed: our loss is already a SUM over this rank's target
tokens divided by the GLOBAL target-token count (training/losses.py), so the gradient
the step needs is the SUM over micro-batches and data-parallel ranks. DeepSpeed divides
by the accumulation steps (disabled: ``scale_wrt_gas=False``) and averages over dp
(undone: ``backward_scale = dp``); see ``TrainEngine.backward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.utils import clip_grad_norm_
from torch import Tensor

from modus_mega.config import ModusConfig
from modus_mega.convert.run_init import init_from_bagel
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.init import init_weights, seeded_vae
from modus_mega.model.inputs import ModelInputs
from modus_mega.model.modus import ModusModel
from modus_mega.model.layers import LinearFactory
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.pipeline import ModusPipeline, PipelineRunner, build_pipeline_model
from modus_mega.parallel.recompute import apply_activation_checkpointing
from modus_mega.parallel.tensor_parallel import apply_tensor_parallel, build_linears, cross_entropy_fn, init_hooks
from modus_mega.training.ema import EmaWeights
from modus_mega.training.failures import NonFiniteGuard, SkippableAdamW, StepGate, StepHealth
from modus_mega.training.losses import CrossEntropyFn
from modus_mega.training.prepare import StepInputs


def build_model(cfg: ModusConfig, ctx: ParallelContext) -> tuple[ModusModel, FluxAutoEncoder]:
    """The trainable model (this rank's tp shard) and the frozen VAE, initialised from ``training.seed``.

    The same seed gives the same full weights at any tp degree (``model/init.py``).
    """
    model = ModusModel(cfg.model, select_linears(cfg, ctx))
    apply_tensor_parallel(model, ctx)
    zero_init = ("llm2vae",) if cfg.model.zero_init_llm2vae else ()
    init_weights(model, cfg.training.seed, cfg.model.llm.init_std, zero_init=zero_init, **init_hooks(ctx))
    if cfg.model.llm.freeze_1d_expert:
        for layer in model.layers:
            layer.experts[0].requires_grad_(False)
    apply_activation_checkpointing(model, cfg.parallel)
    return model.to(ctx.device), build_vae(cfg, ctx)


def select_linears(cfg: ModusConfig, ctx: ParallelContext) -> LinearFactory:
    """The linear layers of ``parallel.tp_backend`` for this layout."""
    if cfg.parallel.tp_backend == "te":
        from modus_mega.parallel.te import build_te_linears

        return build_te_linears(ctx, cfg.model.llm)
    return build_linears(ctx, cfg.model.llm)


def build_vae(cfg: ModusConfig, ctx: ParallelContext) -> FluxAutoEncoder:
    """The frozen VAE on this rank's device, initialised from ``training.seed``."""
    return seeded_vae(cfg).to(ctx.device)


def deepspeed_config(cfg: ModusConfig, ctx: ParallelContext) -> dict[str, Any]:
    """DeepSpeed's config, generated from ours.

    One DeepSpeed "sample" is one packed micro-batch of ``data.token_budget`` tokens; the
    learning rate is set by our schedule each step, so no DeepSpeed scheduler is configured.
    Where DeepSpeed would clip without reporting the norm (fp32 without ZeRO), clipping is
    ours (``TrainEngine.step``) and DeepSpeed's is off.
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
        "bf16": {"enabled": ctx.device.type == "cuda"},
        "steps_per_print": 1 << 30,  # the training loop logs
        "wall_clock_breakdown": False,
    }


def _clips_itself(cfg: ModusConfig, ctx: ParallelContext) -> bool:
    """Whether ``TrainEngine`` clips (fp32 without ZeRO: DeepSpeed's clip there keeps no norm)."""
    return cfg.parallel.zero_stage == 0 and ctx.device.type != "cuda"


@dataclass
class TrainEngine:
    """What a training step needs: the DeepSpeed engine, our optimizer, the VAE and the CE."""

    engine: deepspeed.DeepSpeedEngine
    optimizer: SkippableAdamW  # ours; DeepSpeed (or its ZeRO wrapper) steps it
    vae: FluxAutoEncoder
    cross_entropy: CrossEntropyFn  # matches the LM head's (possibly vocab-sharded) logits
    compute_dtype: torch.dtype  # bf16 on GPU, fp32 on CPU
    backward_scale: float  # dp: undoes DeepSpeed's averaging over data-parallel ranks
    own_clip: float | None  # max grad norm when we clip (inf: measure only); None: DeepSpeed clips
    mpu: Any  # ParallelContext.deepspeed_mpu(): counts tp shards once in the norm
    guard: NonFiniteGuard  # sees every micro-batch loss and gradient contribution (training/failures.py)
    gate: StepGate  # skips an optimizer step whose loss or gradient is non-finite on any rank
    pipeline: PipelineRunner | None = None  # pp > 1: runs whole steps (train_batch); forward / backward / step unused
    ema: EmaWeights | None = None  # training.ema_decay > 0: averaged after every applied optimizer step
    last_health: StepHealth = field(default_factory=StepHealth, init=False)  # of the last optimizer step
    _grad_norm: float = field(default=math.nan, init=False)

    @property
    def model(self) -> ModusModel | ModusPipeline:
        """The wrapped model (this rank's shard; this rank's stage when pp > 1)."""
        return self.engine.module

    def forward(self, inputs: ModelInputs, ce_index: Tensor, mse_index: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [N_ce, V/tp] and velocities [N_mse, P] of one micro-batch."""
        if self.compute_dtype != torch.float32:
            inputs.vit_patches = inputs.vit_patches.to(self.compute_dtype)
            inputs.vae_tokens = inputs.vae_tokens.to(self.compute_dtype)
        return self.engine(inputs, ce_index, mse_index)

    def backward(self, loss: Tensor) -> None:
        """Accumulate this micro-batch's gradient (summed, not averaged, over micro-batches and dp)."""
        self.guard.observe_loss(loss)
        self.engine.backward(loss * self.backward_scale, scale_wrt_gas=False)

    def step(self) -> None:
        """Mark the end of a micro-batch; at the accumulation boundary clip and step the optimizer.

        Gradients are already reduced over dp then (DeepSpeed does it in ``backward``). A step
        whose loss or gradient is non-finite on any rank is skipped (``last_health`` says
        where); an applied step updates the EMA.
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.own_clip is not None and boundary:
            self._grad_norm = float(clip_grad_norm_(self.model.parameters(), self.own_clip, mpu=self.mpu))
        self.engine.step()
        if boundary:
            self._end_step()

    def train_batch(self, steps: list[StepInputs], global_num_ce: int, global_num_mse: int) -> Tensor:
        """pp > 1: one whole optimizer step through the pipeline (``PipelineRunner.train_batch``).

        Returns this dp rank's loss sums [NUM_LOSS_SUMS] float64; skipping and the EMA as in ``step``.
        """
        assert self.pipeline is not None, "train_batch runs pipeline-parallel steps; use forward / backward / step"
        sums = self.pipeline.train_batch(steps, global_num_ce, global_num_mse)
        self._end_step()
        return sums

    def _end_step(self) -> None:
        """After an optimizer step: record its health; an applied step updates the EMA."""
        self.last_health = self.gate.end_step()
        if self.ema is not None and self.last_health.ok:
            self.ema.update()

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group for the next optimizer step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float:
        """Global gradient norm of the last optimizer step, before clipping (NaN when DeepSpeed did not compute it)."""
        if self.pipeline is not None:
            return self.pipeline.grad_norm()
        if self.own_clip is not None:
            return self._grad_norm
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)


def build_engine(cfg: ModusConfig, ctx: ParallelContext) -> TrainEngine:
    """Build, shard, initialise and wrap the model for ``cfg``'s layout.

    With pp > 1 the model is this rank's pipeline stage (``parallel/pipeline.py``) and
    ``TrainEngine.pipeline`` runs the steps.
    """
    if ctx.pp > 1:
        model, vae = build_pipeline_model(cfg, ctx, select_linears(cfg, ctx)), build_vae(cfg, ctx)
    else:
        model, vae = build_model(cfg, ctx)
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
    own_clip = (optim.grad_clip or math.inf) if _clips_itself(cfg, ctx) else None
    compute_dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    guard = NonFiniteGuard(params, ctx.device)
    gate = StepGate(guard, optimizer)  # the first pre-step hook: the verdict precedes the pipeline's clipping
    pipeline = PipelineRunner(engine, optimizer, ctx, compute_dtype, own_clip, guard) if ctx.pp > 1 else None
    return TrainEngine(
        engine=engine,
        optimizer=optimizer,
        vae=vae,
        cross_entropy=cross_entropy_fn(ctx),
        compute_dtype=compute_dtype,
        backward_scale=float(ctx.dp),
        own_clip=None if pipeline else own_clip,  # the pipeline clips in an optimizer pre-step hook
        mpu=mpu,
        guard=guard,
        gate=gate,
        pipeline=pipeline,
        ema=EmaWeights(engine.module, cfg.training.ema_decay) if cfg.training.ema_decay > 0 else None,
    )
