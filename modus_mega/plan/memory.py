"""Memory per GPU of one layout: model states by the ZeRO formulas, activations, buffers.

Peak of the busiest pipeline stage::

    peak = model states + engine buffers
           + (1 + fragmentation) * max(forward/backward activations, VAE encode, optimizer step)

**Model states** (Rajbhandari et al. 2020, DeepSpeed's stage semantics; P = trainable
parameters of this tp rank and stage, N = dp):

| bytes per trainable parameter | ZeRO 0 | 1 | 2 | 3 |
|---|---|---|---|---|
| bf16 weights (2) | 2 | 2 | 2 | 2/N |
| bf16 gradients (2; DeepSpeed accumulates in the model dtype by default) | 2 | 2 | 2/N | 2/N |
| fp32 master weights (4) + Adam m, v (8) | 12 | 12/N | 12/N | 12/N |
| fp32 gradient copy at the optimizer step (4, transient) | 4 | 4/N | 4/N | 4/N (per sub-group) |

ZeRO 2 reproduces DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (``2P + 18P/N``)
exactly; for ZeRO 3 DeepSpeed's estimate (``18P/N`` + 4 bytes per parameter of the
largest layer) leaves out the bf16 gradient partition, which we count (``20P/N``).
Frozen weights (sin-cos tables, and the 1D expert under ``freeze_1d_expert``) cost their
weights only; the frozen VAE stays fp32 (the engine does not cast it).

**EMA** weights are fp32 copies of the trainable weights. ``sharded`` (the default)
keeps them partitioned like the fp32 master weights (1/N under ZeRO >= 1: each dp rank
averages its own partition after the step); ``replicated`` keeps a full copy per tp/pp
shard on every dp rank; ``none`` keeps none.

**Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"), per token of one decoder layer, written for this model's code:
bf16 is b = 2 bytes; D width, Q = heads * head_dim, K = kv heads * head_dim, I the SwiGLU
width, Hq / Hkv heads; t = tp.

- replicated over tp (split by t only with sequence parallelism): each of the two
  RMSNorms saves an fp32 copy of its input (4D; ``layers.RMSNorm`` upcasts), the
  normalised input its weight's gradient needs (bD), its output, which the next linears
  save as their input (bD), and an fp32 rstd per row;
- split over tp: q_norm/k_norm save an fp32 copy and the normalised q, k
  ((4+b)(Q+K)/t); v (bK/t); q, k after RoPE (b(Q+K)/t); the attention output and
  log-sum-exp (bQ/t + 4Hq/t); the o_proj input, which the per-expert gather copies
  (bQ/t); SwiGLU: gate output, SiLU output, up output and their product (4bI/t).

Adapted to MoT: each token runs ONE expert, so activations per token are those of one
dense layer, while weights count both experts. Adapted to the masked attention: the
kernel is flash-style (DESIGN §4), so the ``5as/h`` softmax term of Korthikanti is gone;
only the log-sum-exp is kept. There is no dropout. With ``recompute = "full"`` each layer
keeps its input only (bD, split by t under sequence parallelism) and one layer's
activations are rebuilt at a time during backward; the ViT layers are checkpointed too.

The trainable ViT (first stage, replicated over tp) keeps per patch and layer its two
LayerNorm inputs, outputs and statistics, q, k, v, the (flash-attention) output and
log-sum-exp, and the two GELU MLP tensors; then the post-LayerNorm and the connector. The LM head (last stage) keeps, per CE position, the bf16 logits plus
the fp32 copy and softmax of the vocabulary-parallel cross-entropy ((b + 8) V/t).

Pipeline: under 1F1B, stage s holds min(m, pp - s) micro-batches in flight.

**Engine buffers** (DeepSpeed defaults, which ``training/engine.py`` leaves as they are,
see ``DeepSpeedSettings``): ZeRO 1/2 keep one (two with ``overlap_comm``) reduce buckets
of ``reduce_bucket_size`` gradients; ZeRO 3 one reduce bucket plus the gathered working
set (the largest tensor and its gradient, and the prefetch bucket); ZeRO 0 all-reduces
in buckets of 5e8 after the backward. **Transients**: the frozen VAE encodes a
micro-batch's images at once (about three fp32 feature maps of the first resolution
level per image live at a time); the optimizer step upcasts the gradient partition and
ZeRO 1/2 all-gather the updated weights in ``allgather_bucket_size`` chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import EmaPlacement, Layout
from modus_mega.plan.shapes import ModelShape
from modus_mega.plan.workload import MicroBatch

GIB = 2**30


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state."""

    param_bytes: int  # working weights of the trainable model
    grad_bytes: int  # gradient buffers
    master_bytes: int  # fp32 master weights the optimizer keeps (0 when the weights are fp32 already)
    optimizer_bytes: int  # Adam exp_avg + exp_avg_sq
    step_grad_bytes: int  # fp32 copy of the gradient partition made for the optimizer step
    step_counter_bytes: int  # per trainable tensor (torch AdamW's float32 ``step``)
    frozen_bytes: int  # frozen weights inside the model (sin-cos tables, a frozen expert)
    vae_bytes: int  # the frozen VAE's weights and encode activations
    activation_bytes: int  # saved activations
    ema_bytes: int  # EMA weights


MIXED_BF16 = Precision(
    param_bytes=2, grad_bytes=2, master_bytes=4, optimizer_bytes=8, step_grad_bytes=4, step_counter_bytes=0,
    frozen_bytes=2, vae_bytes=4, activation_bytes=2, ema_bytes=4,
)  # fmt: skip
"""GPU training: DeepSpeed bf16, ZeRO's flat fp32 partitions (step counters per group: negligible)."""

FP32 = Precision(
    param_bytes=4, grad_bytes=4, master_bytes=0, optimizer_bytes=8, step_grad_bytes=0, step_counter_bytes=4,
    frozen_bytes=4, vae_bytes=4, activation_bytes=4, ema_bytes=4,
)  # fmt: skip
"""CPU training: fp32 weights stepped in place by torch.optim.AdamW (one float32 step counter per tensor)."""


@dataclass(frozen=True)
class DeepSpeedSettings:
    """ZeRO engine settings the buffers depend on: DeepSpeed's defaults (``training/engine.py`` sets none)."""

    reduce_bucket_elements: int = 500_000_000  # zero_optimization.reduce_bucket_size
    allgather_bucket_elements: int = 500_000_000  # zero_optimization.allgather_bucket_size
    allreduce_bucket_elements: int = 500_000_000  # engine.allreduce_gradients bucket without ZeRO
    prefetch_bucket_elements: int = 50_000_000  # zero_optimization.stage3_prefetch_bucket_size
    sub_group_elements: int = 1_000_000_000  # zero_optimization.sub_group_size (ZeRO 3 steps per sub-group)

    def overlap_comm(self, zero_stage: int) -> bool:
        """DeepSpeed's default ``overlap_comm``: on for ZeRO 3 only."""
        return zero_stage == 3


@dataclass(frozen=True)
class ModelStates:
    """Bytes of weights and optimizer state one GPU holds (see the module docstring's table)."""

    weights: int  # trainable (ZeRO-3 sharded) + frozen weights + the VAE on the first stage
    gradients: int
    master_weights: int
    optimizer_states: int
    ema: int

    @property
    def total(self) -> int:
        """All model-state bytes."""
        return self.weights + self.gradients + self.master_weights + self.optimizer_states + self.ema


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per GPU on the busiest pipeline stage, by term."""

    stage: int  # the pipeline stage this describes
    states: ModelStates
    buffers: int  # DeepSpeed buckets and the ZeRO-3 gathered working set
    activations: int  # saved for backward by every in-flight micro-batch
    working: int  # one layer's backward (or recompute) working set and the LM head's logits
    encode: int  # VAE encode transient on the first stage (other micro-batches still in flight)
    step: int  # optimizer-step transient: fp32 gradient partition and gather buckets
    fragmentation: int  # allocator margin on the largest dynamic phase

    @property
    def dynamic(self) -> int:
        """The largest of the three dynamic phases."""
        return max(self.activations + self.working, self.encode, self.step)

    @property
    def peak(self) -> int:
        """Peak bytes the GPU must hold for tensors."""
        return self.states.total + self.buffers + self.dynamic + self.fragmentation

    def largest_term(self) -> str:
        """Name of the largest term (used in rejection reasons)."""
        terms = {
            "weights": self.states.weights,
            "gradients": self.states.gradients,
            "master weights + Adam states": self.states.master_weights + self.states.optimizer_states,
            "EMA": self.states.ema,
            "activations": self.activations + self.working,
            "engine buffers": self.buffers,
        }
        return max(terms, key=terms.__getitem__)


def _shard(count: int, parts: int) -> int:
    """Elements of one of ``parts`` equal partitions (DeepSpeed pads the last one)."""
    return math.ceil(count / parts)


def model_states(
    shape: ModelShape, layout: Layout, stage: int, precision: Precision = MIXED_BF16, ema: EmaPlacement = "sharded"
) -> ModelStates:
    """Weights, gradients, master weights, optimizer states and EMA of one GPU of ``stage``."""
    counts = shape.stage(stage, layout.pp)
    trainable, frozen = counts.trainable(layout.tp), counts.frozen(layout.tp)
    z, dp = layout.zero_stage, layout.dp
    optimizer_part = _shard(trainable, dp) if z >= 1 else trainable
    if ema == "none":
        ema_bytes = 0
    else:
        ema_elements = optimizer_part if ema == "sharded" else trainable
        ema_bytes = ema_elements * precision.ema_bytes
    return ModelStates(
        weights=(_shard(trainable, dp) if z == 3 else trainable) * precision.param_bytes
        + frozen * precision.frozen_bytes
        + shape.vae_params(stage) * precision.vae_bytes,
        gradients=(_shard(trainable, dp) if z >= 2 else trainable) * precision.grad_bytes,
        master_weights=optimizer_part * precision.master_bytes,
        optimizer_states=optimizer_part * precision.optimizer_bytes + counts.trainable_tensors * precision.step_counter_bytes,
        ema=ema_bytes,
    )


def step_transient(shape: ModelShape, layout: Layout, stage: int, precision: Precision, ds: DeepSpeedSettings) -> int:
    """Bytes the optimizer step allocates on top of the model states (activations are freed by then)."""
    trainable = shape.stage(stage, layout.pp).trainable(layout.tp)
    z, dp = layout.zero_stage, layout.dp
    if z == 0:
        partition = trainable
        gather = min(ds.allreduce_bucket_elements, trainable) * precision.grad_bytes  # boundary all-reduce bucket
    elif z in (1, 2):
        partition = _shard(trainable, dp)
        gather = min(ds.allgather_bucket_elements, trainable) * precision.param_bytes  # updated-weight all-gather
    else:
        partition = min(_shard(trainable, dp), ds.sub_group_elements)
        gather = 0
    return partition * precision.step_grad_bytes + gather


def engine_buffers(shape: ModelShape, layout: Layout, precision: Precision, ds: DeepSpeedSettings) -> int:
    """DeepSpeed's persistent gradient buckets and, for ZeRO 3, the gathered working set."""
    z = layout.zero_stage
    if z == 0:
        return 0
    reduce = ds.reduce_bucket_elements * precision.grad_bytes
    if z in (1, 2):
        return reduce * (2 if ds.overlap_comm(z) else 1)
    largest = shape.largest_tensor(layout.tp)
    gathered = (largest + ds.prefetch_bucket_elements) * precision.param_bytes + largest * precision.grad_bytes
    return reduce + gathered


def decoder_layer_bytes_per_token(shape: ModelShape, layout: Layout, precision: Precision) -> float:
    """Activation bytes one token leaves in one decoder layer for backward (no recompute)."""
    llm, t, b = shape.cfg.llm, layout.tp, precision.activation_bytes
    d, q, k = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    hq, hkv, inner = llm.num_heads, llm.num_kv_heads, llm.intermediate_size
    replicated = 2 * ((4 + 2 * b) * d + 4)  # two RMSNorms: fp32 input copy, normalised input, output, rstd
    split = (
        (4 + b) * (q + k) + 4 * (hq + hkv)  # q_norm / k_norm: fp32 copy, normalised input, rstd
        + b * k  # v
        + b * (q + k)  # q, k after RoPE
        + b * q + 4 * hq  # attention output and log-sum-exp
        + b * q  # o_proj input (per-expert gather copy)
        + 4 * b * inner  # SwiGLU: gate, SiLU, up, product
    )  # fmt: skip
    return replicated / (t if layout.sequence_parallel else 1) + split / t


def vit_bytes_per_patch(shape: ModelShape, layout: Layout, precision: Precision) -> float:
    """Activation bytes one ViT patch leaves in the vision tower and connector (replicated over tp)."""
    vit, b = shape.cfg.vit, precision.activation_bytes
    d, inner, heads = vit.hidden_size, vit.intermediate_size, vit.num_heads
    width = shape.cfg.llm.hidden_size
    if layout.recompute == "full":
        per_layer = b * d  # checkpointed layer input
    else:
        # two LayerNorms (input, output, fp32 mean and rstd), q/k/v, attention output + lse, GELU MLP
        per_layer = 2 * (2 * b * d + 8) + 3 * b * d + b * d + 4 * heads + 2 * b * inner
    post_norm = b * d + 8  # post_layernorm input and statistics
    connector = b * d + 2 * b * width  # fc1 input (the post_layernorm output), GELU input and output
    return vit.num_layers_used * per_layer + post_norm + connector


def context_bytes_per_token(shape: ModelShape, precision: Precision) -> float:
    """Per-micro-batch tensors every layer reuses: RoPE cos/sin, routing indices, lo/hi, positions."""
    return 2 * precision.activation_bytes * shape.cfg.llm.head_dim + 8 * 2 + 4 * 2 + 8


def activation_memory(shape: ModelShape, layout: Layout, mb: MicroBatch, stage: int, precision: Precision) -> tuple[int, int, int]:
    """(saved activations, working set, VAE encode transient) of one GPU of ``stage``, in bytes."""
    llm, t, b = shape.cfg.llm, layout.tp, precision.activation_bytes
    sp = layout.sequence_parallel
    tokens = mb.tokens
    layers = llm.num_layers // layout.pp
    in_flight = min(layout.grad_accum, layout.pp - stage)
    full_layer = decoder_layer_bytes_per_token(shape, layout, precision) * tokens
    if layout.recompute == "full":
        per_micro_batch = layers * b * llm.hidden_size * tokens / (t if sp else 1)
        working = full_layer  # one layer rebuilt during its backward
    else:
        per_micro_batch = layers * full_layer
        working = 0.0
    working += tokens * (3 * b * llm.intermediate_size / t + 2 * b * llm.hidden_size)  # activation gradients of one layer
    per_micro_batch += context_bytes_per_token(shape, precision) * tokens
    encode = 0.0
    if stage == 0:
        per_micro_batch += vit_bytes_per_patch(shape, layout, precision) * mb.peak_vit_tokens
        pixels = mb.vae_pixels**2
        encode = 3 * shape.cfg.vae.base_channels * pixels * precision.vae_bytes * mb.peak_vae_images
    if stage == layout.pp - 1:
        vocab = shape.vocab_rows / t
        working += mb.peak_ce_tokens * ((b + 8) * vocab + (4 + 2 * b) * llm.hidden_size)
    saved = in_flight * per_micro_batch
    encode_phase = (in_flight - 1) * per_micro_batch + encode
    return int(saved), int(working), int(encode_phase)


def estimate_memory(
    shape: ModelShape,
    layout: Layout,
    mb: MicroBatch,
    calibration: Calibration,
    precision: Precision = MIXED_BF16,
    ema: EmaPlacement = "sharded",
    ds: DeepSpeedSettings = DeepSpeedSettings(),
) -> MemoryEstimate:
    """Peak memory per GPU of ``layout``: the largest over its pipeline stages."""
    estimates = []
    for stage in range(layout.pp):
        saved, working, encode = activation_memory(shape, layout, mb, stage, precision)
        step = step_transient(shape, layout, stage, precision, ds)
        dynamic = max(saved + working, encode, step)
        estimates.append(
            MemoryEstimate(
                stage=stage,
                states=model_states(shape, layout, stage, precision, ema),
                buffers=engine_buffers(shape, layout, precision, ds),
                activations=saved,
                working=working,
                encode=encode,
                step=step,
                fragmentation=int(calibration.fragmentation * dynamic),
            )
        )
    return max(estimates, key=lambda e: e.peak)
