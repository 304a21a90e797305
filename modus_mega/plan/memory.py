"""Memory per GPU of one layout: model states by the ZeRO formulas, activations, buffers.

Peak of the busiest pipeline stage::

    peak = model states + engine buffers
           + (1 + fragmentation) * max(forward/backward activations, VAE encode, optimizer step)

**Model states** (Rajbhandari et al. 2020) as DeepSpeed 0.19's engines lay them out, in
elements per dp rank, for the trainable tensors p_1..p_n of this tp rank and stage in
module order (P = sum p_i; N = dp; F = P rounded up to a multiple of 2N; r = dp rank):

| elements | ZeRO 0 | ZeRO 0, bf16, pp > 1 | ZeRO 1 | ZeRO 2 | ZeRO 3 |
|---|---|---|---|---|---|
| weights, module dtype | P | F | F (one flat buffer) | F | sum ceil(p_i/N) + (N > 1) sum of N ceil(p_i/N) for p_i <= 1e5 |
| gradients, module dtype | P | P + F | max(P, G_r) | G_r | sum ceil(p_i/N) |
| master weights, fp32 | P if the module is not fp32, else 0 | F/N | F/N | F/N | sum ceil(p_i/N) |
| Adam exp_avg + exp_avg_sq, 2 x fp32 | 2P | 2F/N | 2F/N | 2F/N | 2 sum ceil(p_i/N) |
| AdamW ``step`` counters, fp32 | one per tensor | 1 | 1 | 1 | one per sub-group |

Gradients are the most a rank holds at the end of a backward. Under a pipeline
(``parallel/pipeline.py``) the tensors are those of one stage, in the order its
``PipelineStage`` registers them (``ModelShape.stage_tensors``), N is dp (the ranks that
hold the same stage), and DeepSpeed reduces once after the last backward (its
``ReduceGrads`` instruction) instead of inside the boundary's backward: the same buffers,
held until then. Where each term comes from (measured per rank and stage in
``tests/plan/test_memory_engine.py``):

- ZeRO 0: DeepSpeed hands an fp32 model's AdamW through untouched (it steps the weights in
  place: no master copy); a bf16 model gets its unfused mixed-precision wrapper, one fp32
  clone per tensor. Gradients are the tensors' own ``.grad``.
- ZeRO 0 with a bf16 pipeline: DeepSpeed's ``PipelineEngine`` wraps the optimizer in its
  ``BF16_Optimizer`` instead, which partitions like ZeRO 1 (flat bf16 buffer of F, fp32
  master and Adam states of F/N) and accumulates every tensor's ``.grad`` into a second
  flat buffer of F elements in the module dtype (``grad_accum_dtype`` is unset), which it
  keeps, zeroed, between steps; the ``.grad`` are dropped after the step.
- ZeRO 1/2 flatten the trainable tensors into one buffer padded to a multiple of
  ``2 * N`` elements (``nccl_start_alignment_factor``); rank r owns elements
  [rF/N, (r+1)F/N) and keeps an fp32 clone of them (even when the module is fp32).
  Reduced gradients go into a buffer that holds WHOLE tensors: G_r is the sum of the
  p_i that overlap rank r's range, plus, on the last rank, the F - P padding (zeros), so
  a rank holds up to two tensors more than F/N. ZeRO 1 first accumulates the full
  ``.grad`` over the micro-batches and reduces at the accumulation boundary.
- ZeRO 3 pads every tensor to a multiple of N and keeps 1/N of it (``ds_tensor``, one flat
  buffer for the trainable ones), frozen tensors too; tensors of at most
  ``stage3_param_persistence_threshold`` (1e5) elements also stay gathered whole on every
  rank after the first step (norms, biases), each in its padded all-gather buffer of
  N ceil(p_i/N) elements (at N = 1 DeepSpeed gathers nothing: the weight is a view of
  its partition). Gradients are one flat partition buffer, kept between steps; the
  optimizer steps sub-groups of up to ``sub_group_size`` elements, each its own flat
  fp32 tensor with its own step counter.
- Precision is an input (``Precision``): GPU runs are bf16 modules with fp32 master
  weights and Adam states (``MIXED_BF16``); the CPU runs train fp32 modules
  (``FP32``) through the same engines and formulas. torch keeps AdamW's ``step`` on the
  host unless ``capturable``, so it costs GPU memory nothing and CPU memory 4 bytes each.
- Frozen weights (the sin-cos tables, and the 1D expert under ``freeze_1d_expert``) cost
  their weights only (module dtype; partitioned as above under ZeRO 3); the frozen VAE
  is not part of the engine: whole, fp32, on every pipeline stage (each rank encodes its
  micro-batches: the first stage for the inputs, the last for the velocity targets).

DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (``2P + 18P/N``: bf16 weights, bf16
gradient partition, and an fp32 gradient partition, master and Adam states) is the table's
ZeRO 2 column plus the fp32 gradient copy of the optimizer step, with F = P and G_r = P/N;
``estimate_zero3_model_states_mem_needs`` (``18P/N`` + 4 bytes per element of the largest
layer) leaves out the bf16 gradient partition and the persistent tensors and counts the
gathered largest layer, which is an engine buffer here.

**EMA** weights are fp32 copies of the trainable weights. ``sharded`` (the default, what
``parallel/ema.py`` does) keeps them partitioned like the fp32 master weights: each dp
rank averages the weights its optimizer owns, padding excluded (ZeRO 1/2: the real
elements of its range of the flat buffer; ZeRO 3: of its slice of each tensor; without
ZeRO every rank owns all of them); ``replicated`` keeps a full copy per tp/pp shard on
every dp rank; ``none`` keeps none.

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
the fp32 copy and softmax of the vocabulary-parallel cross-entropy ((b + 8) V/t; with
pp > 1 too: there the heads run in the last stage's loss, after its pipe buffers).

Pipeline: under 1F1B, stage s holds min(m, pp - s) micro-batches in flight. Each of them
also keeps, in DeepSpeed's pipe buffers, the ``StageActivations`` that crossed a stage
boundary: T (b D + 24) bytes (the hidden states and the integer metadata: token_type,
position_ids int64, attn_lo, attn_hi int32), received (s > 0) until its
gradient is sent back, sent (s < pp - 1) until its backward (``pipeline_buffers``).

**Engine buffers** (DeepSpeed defaults, which ``training/engine.py`` leaves as they are,
see ``DeepSpeedSettings``): ZeRO 1/2 keep one (two with ``overlap_comm``) reduce buckets
of ``reduce_bucket_size`` gradients; ZeRO 3 one reduce bucket plus the gathered working
set (the largest tensor and its gradient, and the prefetch bucket); ZeRO 0 all-reduces
in buckets of 5e8 after the backward. A ``PipelineEngine`` (pp > 1) keeps, from its
first step on, receive buffers (T (b D + 24) bytes on a stage that receives activations;
the T b D gradient of the hidden states needs its own only on the first stage, a middle
stage receives it into its activation buffer), and it never frees what its pipe buffers
load or the last stage computes: each of max(2, min(pp - s, m)) buffers holds the loaded
micro-batch inputs on the first stage, the labels (the loss targets) and the stage's output
(the final hidden states, T b D) on the last, until the next step overwrites them. **Transients**: the frozen VAE encodes a
micro-batch's images at once (about three fp32 feature maps of the first resolution
level per image live at a time; the training loop encodes all of a step's micro-batches
before the first forward, so no activations are in flight then); the optimizer step
upcasts the gradient partition and ZeRO 1/2 all-gather the updated weights in
``allgather_bucket_size`` chunks.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import EmaPlacement, Layout
from modus_mega.plan.shapes import ModelShape
from modus_mega.plan.workload import MicroBatch

GIB = 2**30


NCCL_START_ALIGNMENT = 2  # DeepSpeed ZeRO 1/2 pad the flat buffer to a multiple of this many elements per dp rank


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state: the input that makes one set of formulas fit GPU and CPU runs."""

    param_bytes: int  # the engine's module dtype: trainable weights
    grad_bytes: int  # gradients (DeepSpeed accumulates and reduces them in the module dtype)
    master_bytes: int  # the optimizer's master weights (fp32 on every DeepSpeed path)
    optimizer_bytes: int  # Adam exp_avg + exp_avg_sq per master element
    step_counter_bytes: int  # per AdamW state tensor, its ``step``: 4 where it lives on the training device, else 0
    frozen_bytes: int  # frozen weights inside the engine's module (the module dtype)
    vae_bytes: int  # the frozen VAE's weights and encode activations (the engine does not cast it)
    activation_bytes: int  # saved activations
    ema_bytes: int  # EMA weights

    @property
    def module_is_master(self) -> bool:
        """Whether the module's weights are already in the master dtype (fp32 training)."""
        return self.param_bytes == self.master_bytes


MIXED_BF16 = Precision(
    param_bytes=2, grad_bytes=2, master_bytes=4, optimizer_bytes=8, step_counter_bytes=0,
    frozen_bytes=2, vae_bytes=4, activation_bytes=2, ema_bytes=4,
)  # fmt: skip
"""GPU training: DeepSpeed bf16 (``training/engine.py`` on CUDA); AdamW's step counters stay on the host."""

FP32 = Precision(
    param_bytes=4, grad_bytes=4, master_bytes=4, optimizer_bytes=8, step_counter_bytes=4,
    frozen_bytes=4, vae_bytes=4, activation_bytes=4, ema_bytes=4,
)  # fmt: skip
"""CPU training: DeepSpeed without bf16 (``training/engine.py`` on CPU); everything, step counters included, in CPU memory."""


@dataclass(frozen=True)
class DeepSpeedSettings:
    """ZeRO engine settings the buffers depend on: DeepSpeed's defaults (``training/engine.py`` sets none)."""

    reduce_bucket_elements: int = 500_000_000  # zero_optimization.reduce_bucket_size
    allgather_bucket_elements: int = 500_000_000  # zero_optimization.allgather_bucket_size
    allreduce_bucket_elements: int = 500_000_000  # engine.allreduce_gradients bucket without ZeRO
    prefetch_bucket_elements: int = 50_000_000  # zero_optimization.stage3_prefetch_bucket_size
    sub_group_elements: int = 1_000_000_000  # zero_optimization.sub_group_size (ZeRO 3 steps per sub-group)
    persistence_threshold: int = 100_000  # zero_optimization.stage3_param_persistence_threshold (kept whole at or below)

    def overlap_comm(self, zero_stage: int) -> bool:
        """DeepSpeed's default ``overlap_comm``: on for ZeRO 3 only."""
        return zero_stage == 3


@dataclass(frozen=True)
class ZeroElements:
    """Elements of each model state one dp rank holds (see the module docstring's table)."""

    weights: int  # trainable weights in the module dtype (ZeRO 1/2: the padded flat buffer)
    frozen: int  # frozen weights inside the engine's module
    gradients: int  # the most gradient elements held at the end of a backward
    master: int  # fp32 master elements, 0 where the optimizer steps the module's weights in place
    optimizer: int  # elements of each Adam moment
    step_counters: int  # AdamW state tensors (one ``step`` each)
    owned: int  # weight elements this rank's optimizer updates, padding excluded (what a sharded EMA averages)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bf16_pipeline_optimizer(layout: Layout, precision: Precision) -> bool:
    """Whether DeepSpeed steps this layout through its ``BF16_Optimizer``: ZeRO 0, pp > 1, a bf16 module.

    ``PipelineEngine`` picks it where ``DeepSpeedEngine`` would pick its unfused
    mixed-precision wrapper (pp = 1); it partitions the optimizer like ZeRO 1.
    """
    return layout.zero_stage == 0 and layout.pp > 1 and not precision.module_is_master


def flat_numel(trainable: int, dp: int) -> int:
    """ZeRO 1/2's flat buffer: the trainable elements padded to a multiple of ``2 * dp``."""
    alignment = NCCL_START_ALIGNMENT * dp
    return _ceil_div(trainable, alignment) * alignment


@functools.lru_cache(maxsize=256)
def zero12_gradient_elements(sizes: tuple[int, ...], dp: int) -> tuple[int, ...]:
    """Per dp rank, the elements of ZeRO 1/2's reduced-gradient buffer at the accumulation boundary.

    ``sizes`` are the trainable tensors in flattening order. Rank r's buffer holds every
    tensor that overlaps its range of the flat buffer whole, and zeros for the part of
    its range that is padding (a range of padding only is all zeros).
    """
    total = sum(sizes)
    partition = flat_numel(total, dp) // dp
    ends = list(itertools.accumulate(sizes))
    starts = [end - size for end, size in zip(ends, sizes)]
    prefix = [0, *ends]  # prefix[i] = elements of tensors before i
    per_rank = []
    for rank in range(dp):
        lo, hi = rank * partition, (rank + 1) * partition
        first = bisect.bisect_right(ends, lo)  # first tensor ending after lo
        stop = bisect.bisect_left(starts, hi)  # tensors starting before hi
        whole = prefix[stop] - prefix[first] if stop > first else 0
        padding = partition - max(0, min(hi, total) - lo)
        per_rank.append(whole + padding)
    return tuple(per_rank)


def _zero3_sub_groups(partitions: list[int], sub_group_elements: int) -> int:
    """Sub-groups ZeRO 3 cuts the partitions into (a group closes once it reaches ``sub_group_elements``)."""
    if sum(partitions) <= sub_group_elements:
        return 1
    groups, size = 0, 0
    for index, partition in enumerate(partitions):
        size += partition
        if size >= sub_group_elements or index == len(partitions) - 1:
            groups, size = groups + 1, 0
    return groups


def zero_elements(
    shape: ModelShape,
    layout: Layout,
    stage: int,
    precision: Precision = MIXED_BF16,
    ds: DeepSpeedSettings = DeepSpeedSettings(),
    dp_rank: int | None = None,
) -> ZeroElements:
    """Elements of each model state on dp rank ``dp_rank`` of ``stage``.

    None takes, term by term, the most any rank holds (the ranks differ by padding and by
    ZeRO 2's whole-tensor gradients), an upper bound of the busiest rank.
    """
    z, dp = layout.zero_stage, layout.dp
    if dp_rank is not None and not 0 <= dp_rank < dp:
        raise ValueError(f"dp_rank {dp_rank} does not exist for dp={dp}")
    tensors = shape.stage_tensors(stage, layout.pp)
    trainable = tuple(t.local_numel(layout.tp) for t in tensors if t.trainable)
    frozen = [t.local_numel(layout.tp) for t in tensors if not t.trainable]
    total = sum(trainable)
    ranks = range(dp) if dp_rank is None else (dp_rank,)
    first = 0 if dp_rank is None else dp_rank  # owned elements never grow with the rank: rank 0 owns the most
    bf16_pipeline = bf16_pipeline_optimizer(layout, precision)
    if z == 0 and not bf16_pipeline:
        master = 0 if precision.module_is_master else total
        return ZeroElements(total, sum(frozen), total, master, total, len(trainable), owned=total)
    if z in (0, 1, 2):
        flat = flat_numel(total, dp)
        partition = flat // dp
        if bf16_pipeline:
            gradients = total + flat  # every tensor's .grad, accumulated into a flat buffer of F
        else:
            boundary = zero12_gradient_elements(trainable, dp)
            reduced = max(boundary[r] for r in ranks)
            gradients = max(total, reduced) if z == 1 else reduced
        owned = max(0, min((first + 1) * partition, total) - first * partition)
        return ZeroElements(flat, sum(frozen), gradients, partition, partition, 1, owned)
    partitions = [_ceil_div(n, dp) for n in trainable]
    part = sum(partitions)
    owned = sum(max(0, min(p, n - first * p)) for n, p in zip(trainable, partitions))

    def gathered(sizes: Sequence[int]) -> int:
        """Persistent tensors, all-gathered into padded buffers (at dp = 1 the weight is a view of its partition)."""
        if dp == 1:
            return 0
        return sum(_ceil_div(n, dp) * dp for n in sizes if n <= ds.persistence_threshold)

    return ZeroElements(
        weights=part + gathered(trainable),
        frozen=sum(_ceil_div(n, dp) for n in frozen) + gathered(frozen),
        gradients=part,
        master=part,
        optimizer=part,
        step_counters=_zero3_sub_groups(partitions, ds.sub_group_elements),
        owned=owned,
    )


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
    buffers: int  # DeepSpeed buckets, the ZeRO-3 gathered working set, the pipeline engine's kept buffers
    activations: int  # saved for backward by every in-flight micro-batch, with its stage-boundary tensors
    working: int  # one layer's backward (or recompute) working set and the LM head's logits
    encode: int  # VAE encode transient (before the step's first forward)
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


def model_states(
    shape: ModelShape,
    layout: Layout,
    stage: int,
    precision: Precision = MIXED_BF16,
    ema: EmaPlacement = "sharded",
    ds: DeepSpeedSettings = DeepSpeedSettings(),
    dp_rank: int | None = None,
) -> ModelStates:
    """Weights, gradients, master weights, optimizer states and EMA of one GPU of ``stage``.

    ``dp_rank`` picks the data-parallel rank (ranks differ by padding and ZeRO 2's gradient
    buffer); None takes the most any rank holds, term by term.
    """
    e = zero_elements(shape, layout, stage, precision, ds, dp_rank)
    if ema == "none":
        ema_elements = 0
    elif ema == "sharded":
        ema_elements = e.owned
    else:
        ema_elements = shape.stage(stage, layout.pp).trainable(layout.tp)
    return ModelStates(
        weights=e.weights * precision.param_bytes
        + e.frozen * precision.frozen_bytes
        + shape.vae_params(stage) * precision.vae_bytes,
        gradients=e.gradients * precision.grad_bytes,
        master_weights=e.master * precision.master_bytes,
        optimizer_states=e.optimizer * precision.optimizer_bytes + e.step_counters * precision.step_counter_bytes,
        ema=ema_elements * precision.ema_bytes,
    )


def step_transient(shape: ModelShape, layout: Layout, stage: int, precision: Precision, ds: DeepSpeedSettings) -> int:
    """Bytes the optimizer step allocates on top of the model states (activations are freed by then).

    Read from DeepSpeed's step code: without ZeRO, a bf16 module's gradients are upcast
    tensor by tensor (an fp32 module's AdamW reads ``.grad`` itself), after the boundary
    all-reduce flattened them bucket by bucket (a bf16 pipeline's ``BF16_Optimizer``: see
    below). ZeRO 1/2 flatten the rank's gradient
    partition into a new tensor and upcast it to fp32 (a second copy unless the gradients
    are fp32 already), then all-gather the updated weights in ``allgather_bucket_size``
    chunks; ZeRO 3 flattens and upcasts one sub-group at a time.
    """
    trainable = shape.stage(stage, layout.pp).trainable(layout.tp)
    z = layout.zero_stage
    upcast = 0 if precision.grad_bytes == precision.master_bytes else precision.master_bytes
    if z == 0 and not bf16_pipeline_optimizer(layout, precision):
        return trainable * upcast + min(ds.allreduce_bucket_elements, trainable) * precision.grad_bytes
    e = zero_elements(shape, layout, stage, precision, ds)
    partition = e.master
    gather = min(ds.allgather_bucket_elements, trainable) * precision.param_bytes
    if z == 0:
        # BF16_Optimizer: the all-reduce flattens its flat gradient buffer into a copy (one bucket,
        # before the step); the step upcasts this rank's partition of it (a view) and all-gathers.
        return max(e.weights * precision.grad_bytes, partition * upcast + gather)
    if z in (1, 2):
        return partition * (precision.grad_bytes + upcast) + gather
    return min(partition, ds.sub_group_elements) * (precision.grad_bytes + upcast)


def reduce_buckets(layout: Layout, precision: Precision, ds: DeepSpeedSettings) -> int:
    """Bytes of ZeRO's gradient reduce buckets: ``reduce_bucket_size`` gradients each, whatever the model's size.

    ZeRO 1/2 allocate them at the first gradient of a backward and free them when a backward
    ends (ZeRO 1: only the one at the accumulation boundary), two with ``overlap_comm``;
    ZeRO 3 allocates one at initialisation and keeps it.
    """
    z = layout.zero_stage
    if z == 0:
        return 0
    buckets = 2 if z in (1, 2) and ds.overlap_comm(z) else 1
    return buckets * ds.reduce_bucket_elements * precision.grad_bytes


def engine_buffers(shape: ModelShape, layout: Layout, precision: Precision, ds: DeepSpeedSettings) -> int:
    """DeepSpeed's gradient reduce buckets and, for ZeRO 3, the gathered working set."""
    z = layout.zero_stage
    reduce = reduce_buckets(layout, precision, ds)
    if z < 3:
        return reduce
    largest = shape.largest_tensor(layout.tp)
    gathered = (largest + ds.prefetch_bucket_elements) * precision.param_bytes + largest * precision.grad_bytes
    return reduce + gathered


@dataclass(frozen=True)
class MicroBatchTensors:
    """Rows of one micro-batch's tensors that a pipeline engine keeps (``parallel/pipeline.py``:
    ``stage_micro_batch``'s inputs on the first stage, its ``LossTargets`` labels and the final hidden states on the last)."""

    tokens: int  # T, the token budget
    vit_patches: int
    vit_images: int
    vae_tokens: int  # 2D tokens entering vae2llm, clean and noisy
    ce_tokens: int  # positions with a CE target: rows of the logits
    mse_tokens: int  # noisy 2D target tokens: rows of the velocities

    @classmethod
    def at_peak(cls, shape: ModelShape, mb: MicroBatch) -> "MicroBatchTensors":
        """The planner's micro-batch at its memory peaks, bounded above: every VAE image a
        target, and as many ViT images as patches (``cu_seqlens``: 4 bytes each)."""
        cfg = shape.cfg
        per_image = (mb.vae_pixels // (cfg.vae.downsample * cfg.latent_patch_size)) ** 2
        vae_tokens = min(mb.tokens, math.ceil(mb.peak_vae_images) * per_image)
        vit_patches = min(mb.tokens, math.ceil(mb.peak_vit_tokens))
        return cls(mb.tokens, vit_patches, vit_patches, vae_tokens, math.ceil(mb.peak_ce_tokens), vae_tokens)


@dataclass(frozen=True)
class PipeBuffers:
    """Bytes in the pipe buffers of a ``PipelineEngine`` on one stage (``pipeline_buffers``; nothing at pp = 1)."""

    in_flight: int  # ``StageActivations`` of the micro-batches in flight, received and / or sent, until their backward
    kept: int  # from the first step on: receive buffers, each buffer's inputs (first stage), labels and head outputs (last)


BOUNDARY_METADATA_BYTES = 24  # per token besides the hidden state: token_type, position_ids int64, attn_lo/hi int32
FIRST_STAGE_TOKEN_BYTES = 8 + BOUNDARY_METADATA_BYTES  # per token of the first stage's ``ModelInputs``: input_ids too


def pipe_buffer_count(layout: Layout, stage: int) -> int:
    """Pipe buffers of ``stage``: DeepSpeed's ``TrainSchedule.num_pipe_buffers``, max(2, min(pp - s, m))."""
    return max(2, min(layout.pp - stage, layout.grad_accum))


def pipeline_buffers(
    shape: ModelShape, layout: Layout, tensors: MicroBatchTensors, stage: int, precision: Precision
) -> PipeBuffers:
    """What DeepSpeed's ``PipelineEngine`` holds on ``stage`` besides autograd's saved tensors.

    Read from its engine (``deepspeed/runtime/pipe/engine.py``) and measured in
    ``tests/plan/test_memory_engine.py``; b is the compute dtype's bytes:

    - in flight, per micro-batch (min(m, pp - s) of them): the ``StageActivations`` it
      received (s > 0; the forward runs on a clone, the original takes the gradient that is
      sent back) and the one it sent (s < pp - 1; kept with its graph for the backward),
      each T (b D + 24) bytes (hidden states; token_type, position_ids int64; attn_lo,
      attn_hi int32), the hidden states only ceil(T / t) rows under
      sequence parallelism;
    - kept: the receive buffer (one ``StageActivations``; on the first stage the T b D
      gradient of the hidden states, which later stages receive into their activation
      buffer), and for each of the min(buffers, m) pipe buffers in use what it loaded or
      computed, never freed before the next step overwrites it: the first stage's
      ``stage_micro_batch``'s first-stage inputs (T int64 ids and metadata, ViT pixels in b with int64 position ids
      and int32 ``cu_seqlens``, 2D latents in b with fp32 timesteps and int64 position
      ids), the last stage's ``LossTargets`` (int64 CE positions, labels and modalities;
      int64 MSE positions, velocity targets in the VAE's dtype and int64 modalities) and
      its output, the final hidden states [T, D] in b (the engine drops a forward's outputs
      after its backward on every stage but the last, whose backward returns before that;
      the heads run in the loss, so their logits are the activations' ``working`` bytes).
    """
    if layout.pp == 1:
        return PipeBuffers(0, 0)
    cfg, b, t = shape.cfg, precision.activation_bytes, tensors
    first, last = stage == 0, stage == layout.pp - 1
    rows = -(-t.tokens // layout.tp) if layout.sequence_parallel else t.tokens  # SP: each tp rank sends its rows
    hidden = rows * cfg.llm.hidden_size * b
    boundary = hidden + t.tokens * BOUNDARY_METADATA_BYTES
    sides = (not first) + (not last)  # receives from the previous stage, sends to the next
    in_flight = min(layout.grad_accum, layout.pp - stage) * boundary * sides
    latent = cfg.patch_latent_dim
    per_buffer = 0
    if first:
        pixels = cfg.vit.patch_size**2 * cfg.vit.num_channels
        per_buffer += (
            FIRST_STAGE_TOKEN_BYTES * t.tokens
            + t.vit_patches * (pixels * b + 8) + 4 * (t.vit_images + 1)
            + t.vae_tokens * (latent * b + 4 + 8)
        )  # fmt: skip
    if last:
        labels = 24 * t.ce_tokens + t.mse_tokens * (latent * precision.vae_bytes + 16)
        outputs = t.tokens * cfg.llm.hidden_size * b  # the gathered final hidden states
        per_buffer += labels + outputs
    receive = hidden if first else boundary
    kept = receive + min(pipe_buffer_count(layout, stage), layout.grad_accum) * per_buffer
    return PipeBuffers(in_flight, kept)


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
    if stage == 0:
        per_micro_batch += vit_bytes_per_patch(shape, layout, precision) * mb.peak_vit_tokens
    if stage == layout.pp - 1:
        vocab = shape.vocab_rows / t
        working += mb.peak_ce_tokens * ((b + 8) * vocab + (4 + 2 * b) * llm.hidden_size)
    saved = in_flight * per_micro_batch
    # Every stage encodes, before the step's first forward (training/loop.py), so nothing is in flight then.
    encode = 3 * shape.cfg.vae.base_channels * mb.vae_pixels**2 * precision.vae_bytes * mb.peak_vae_images
    return int(saved), int(working), int(encode)


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
    tensors = MicroBatchTensors.at_peak(shape, mb)
    for stage in range(layout.pp):
        saved, working, encode = activation_memory(shape, layout, mb, stage, precision)
        pipe = pipeline_buffers(shape, layout, tensors, stage, precision)
        saved += pipe.in_flight
        step = step_transient(shape, layout, stage, precision, ds)
        dynamic = max(saved + working, encode, step)
        estimates.append(
            MemoryEstimate(
                stage=stage,
                states=model_states(shape, layout, stage, precision, ema),
                buffers=engine_buffers(shape, layout, precision, ds) + pipe.kept,
                activations=saved,
                working=working,
                encode=encode,
                step=step,
                fragmentation=int(calibration.fragmentation * dynamic),
            )
        )
    return max(estimates, key=lambda e: e.peak)
