"""Step time of one layout: compute at calibrated rates, communication, pipeline bubble.

Compute, per micro-batch and GPU of the slowest pipeline stage (FLOPs over the
calibrated achieved TFLOP/s of each kind of work; t = tp):

- decoder linears: ``2 * W * T / t`` forward, W = one expert's linear weights per layer
  (each token multiplies ONE expert: MoT), T = the token budget (padding runs too);
- attention: ``4 * Hq * head_dim * pairs / t`` forward, ``pairs`` = (query, key) pairs the
  MODUS mask allows (``workload.visible_pairs``: causal prefixes, whole full splits,
  noise splits seen only from inside), not T^2;
- backward = 2x forward; ``recompute = "full"`` adds one more forward;
- first stage: the ViT (fwd + bwd, replicated on every tp rank);
- last stage: the LM head at the positions that carry a CE loss only;
- every stage: the frozen VAE encoder (forward only, counted with ``FlopCounterMode`` on
  the meta device). Every rank, whatever its stage and tp rank, builds the VAE and
  encodes each of its m micro-batches (``training/loop.py``, ``training/prepare.py``),
  all of them before the step's first forward: the stages encode at once, outside the
  pipeline schedule, so the encode adds m encodes to the step and nothing to the bubble.

Communication (ring collectives: an all-reduce moves ``2 (n-1)/n`` of the message per
GPU at NCCL's bus bandwidth, a reduce-scatter or all-gather ``(n-1)/n``):

- **TP** (NVLink, never overlapped: Megatron-core without Transformer Engine's
  userbuffers): the collectives of ``parallel/collectives.py`` over the residual stream,
  [T, D] for plain TP and [T_pad, D] under sequence parallelism (T padded to a multiple of
  tp), per micro-batch and decoder layer (two blocks, attention and MLP):

  ======================  ==============================  ==================================
  per decoder layer       plain TP                        sequence parallel
  ======================  ==============================  ==================================
  forward                 2 all-reduce (``reduce``)       2 all-gather (``project``)
                                                          + 2 reduce-scatter (``reduce``)
  backward                2 all-reduce (``project``),     4 all-gather (``reduce``'s
                          each issued per expert on its   backward, ``_Regathered``)
                          [T_e, D]: 4 collectives         + 2 reduce-scatter (``project``)
  ``recompute = "full"``  1 all-reduce                    2 all-gather + 1 reduce-scatter
  ======================  ==============================  ==================================

  Recomputation reruns the layer's forward only up to the last tensor its backward needs
  (non-reentrant checkpointing stops there), which comes before the MLP block's
  ``reduce``: the attention block's collectives run again, the MLP's gather too, its
  final reduction does not. In ring passes over the message that is 8 per layer for plain
  TP (10 with recomputation) and 10 for sequence parallelism (13): SP saves activation
  memory and pays 25% more TP traffic (30% with recomputation). Under
  ``freeze_1d_expert`` the 1D expert's q, k, v are detached, so plain TP skips that
  expert's backward all-reduce in the attention block.

  Besides, each norm weight whose gradient is a partial sum is all-reduced per layer and
  trained expert (q_norm and k_norm, both layer norms under SP, the o_proj bias if any:
  ``apply_tensor_parallel``). The first stage all-reduces the vocab-parallel embedding's
  output ([N_text, D]: every token but the ViT and VAE ones, padding included) and, under
  SP, all-gathers the decoder input's gradient; the last stage, under SP, all-gathers the
  decoder output, all-reduces the LM head input's gradient ([N_ce, D], ``copy``) and, in
  the vocab-parallel cross-entropy, three [N_ce] statistics. Those vectors and statistics
  cost latency only. Every collective pays ``nvlink_latency_us``. The slowest stage is the
  one with the most compute + TP time.
- **PP**: the 1F1B schedule runs ``m + p - 1`` slots of the slowest stage, each slot one
  micro-batch's forward + backward + its two blocking transfers (over NVLink when a
  stage's neighbour is on the same node, else InfiniBand): forward, the
  ``StageActivations`` (hidden states and the integer metadata beside them,
  ``memory.BOUNDARY_METADATA_BYTES`` per token); backward, the gradient of the hidden
  states only (the one float tensor of the tuple). The bubble is the
  ``(p - 1) / (m + p - 1)`` share.
- **DP** (InfiniBand once a dp group leaves the node; bf16 gradients): ZeRO 0
  all-reduces after the last backward; ZeRO 1 reduce-scatters then, and all-gathers the
  updated weights after the step; ZeRO 2 reduce-scatters after every micro-batch's
  backward; ZeRO 3 all-gathers the weights in every forward and backward and
  reduce-scatters every backward. Only DeepSpeed's ``overlap_comm`` (default: ZeRO 3
  only) hides a collective, behind ``calibration.overlap`` of the compute it runs under
  (the forward and backward, not the VAE encode before them); with pp > 1 DeepSpeed
  reduces after the pipeline flush, exposed. ZeRO 0 in a bf16 pipeline steps through
  DeepSpeed's ``BF16_Optimizer`` (``memory.bf16_pipeline_optimizer``, the rule the memory
  model follows): it all-reduces the gradients as ZeRO 0 does, steps this rank's
  partition like ZeRO 1 and all-gathers the updated weights after the step.
- **Optimizer**: Adam over this GPU's partition (1/dp of the trainable weights wherever
  the optimizer is partitioned: ZeRO >= 1 and ``BF16_Optimizer``) is HBM bound (about 32
  bytes moved per parameter, 8 more with EMA on the partition).

MFU counts useful model FLOPs (real tokens, no recompute, no padding; the ViT and the VAE
once per micro-batch, not once per tp rank, nor the VAE once per stage) over
``step time * GPUs * peak``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import EmaPlacement, Layout
from modus_mega.plan.memory import (
    BOUNDARY_METADATA_BYTES,
    MIXED_BF16,
    DeepSpeedSettings,
    Precision,
    bf16_pipeline_optimizer,
)
from modus_mega.plan.shapes import ModelShape
from modus_mega.plan.workload import MicroBatch


@dataclass(frozen=True)
class StepEstimate:
    """Seconds of one optimizer step by term, and what the step achieves."""

    compute_s: float  # m micro-batches of forward + backward (+ recompute) on the slowest stage, and their VAE encode
    tp_comm_s: float  # tensor-parallel collectives (critical path)
    pp_bubble_s: float  # idle (p - 1) slots of the 1F1B schedule
    pp_p2p_s: float  # activation and gradient transfers between stages
    dp_comm_s: float  # exposed data-parallel / ZeRO communication
    optimizer_s: float  # Adam step over this GPU's partition
    model_flops: float  # useful FLOPs of the step over all GPUs
    real_tokens: float  # real (non-padding) tokens of the step over all GPUs

    @property
    def total_s(self) -> float:
        """Seconds per optimizer step."""
        return self.compute_s + self.tp_comm_s + self.pp_bubble_s + self.pp_p2p_s + self.dp_comm_s + self.optimizer_s

    def tokens_per_s_per_gpu(self, gpus: int) -> float:
        """Real tokens per second per GPU."""
        return self.real_tokens / self.total_s / gpus

    def mfu(self, gpus: int, peak_tflops: float) -> float:
        """Model FLOPs utilisation."""
        return self.model_flops / (self.total_s * gpus * peak_tflops * 1e12)


@dataclass(frozen=True)
class MicroBatchFlops:
    """Forward FLOPs of one micro-batch, by kind of work, for the whole model (not per GPU)."""

    decoder_linear: float  # per decoder layer
    attention: float  # per decoder layer
    vit: float  # vision tower and connector (trainable)
    vae: float  # frozen VAE encoder
    lm_head: float


def micro_batch_flops(shape: ModelShape, mb: MicroBatch, vae_image_flops: float, useful: bool) -> MicroBatchFlops:
    """Forward FLOPs of micro-batch ``mb``: all it computes, or (``useful``) its real documents only."""
    llm, vit = shape.cfg.llm, shape.cfg.vit
    d = vit.hidden_size
    patch_dim = vit.patch_size**2 * vit.num_channels
    vit_per_patch = (
        2 * patch_dim * d  # patch embedding
        + vit.num_layers_used * 2 * (4 * d * d + 2 * d * vit.intermediate_size)  # q, k, v, out, fc1, fc2
        + 2 * (d * llm.hidden_size + llm.hidden_size**2)  # connector
    )
    tokens = mb.real_tokens if useful else mb.tokens
    pairs = mb.attention_pairs - (mb.tokens - mb.real_tokens) if useful else mb.attention_pairs  # padding sees itself
    return MicroBatchFlops(
        decoder_linear=2.0 * shape.expert_linear_weights * tokens,
        attention=4.0 * llm.num_heads * llm.head_dim * pairs,
        vit=vit_per_patch * mb.vit_tokens + vit.num_layers_used * 4.0 * d * mb.vit_pairs,
        vae=vae_image_flops * mb.vae_images,
        lm_head=2.0 * llm.hidden_size * shape.vocab_rows * mb.ce_tokens,
    )


def training_flops(flops: MicroBatchFlops, num_layers: int) -> float:
    """Forward + backward FLOPs of a micro-batch: 3x the trainable forward, 1x the frozen VAE encoder."""
    return 3.0 * (num_layers * (flops.decoder_linear + flops.attention) + flops.vit + flops.lm_head) + flops.vae


def _ring_seconds(message_bytes: float, ranks: int, busbw_gbps: float, factor: float) -> float:
    """Bandwidth time of a ring collective: ``factor`` 2 for all-reduce, 1 for reduce-scatter / all-gather."""
    if ranks <= 1:
        return 0.0
    return factor * (ranks - 1) / ranks * message_bytes / (busbw_gbps * 1e9)


@dataclass(frozen=True)
class TensorParallelTraffic:
    """The tensor-parallel collectives of one micro-batch on one pipeline stage (module docstring)."""

    ring_bytes: float  # message bytes times ring passes over them: 2 per all-reduce, 1 per all-gather or reduce-scatter
    collectives: int  # collectives issued, each paying the latency

    def seconds(self, tp: int, calibration: Calibration) -> float:
        """Time on NVLink: the ring's ``(tp - 1) / tp`` share of the bytes at bus bandwidth, plus latencies."""
        if tp == 1:
            return 0.0
        bandwidth = (tp - 1) / tp * self.ring_bytes / (calibration.nvlink_busbw_gbps * 1e9)
        return bandwidth + self.collectives * calibration.nvlink_latency_us * 1e-6


def tensor_parallel_traffic(
    shape: ModelShape, layout: Layout, mb: MicroBatch, stage: int, precision: Precision = MIXED_BF16
) -> TensorParallelTraffic:
    """What ``stage`` exchanges over its tp group for one micro-batch: forward, backward and recomputation."""
    cfg, t = shape.cfg, layout.tp
    llm = cfg.llm
    if t == 1:
        return TensorParallelTraffic(0.0, 0)
    sp, recompute, frozen = layout.sequence_parallel, layout.recompute == "full", llm.freeze_1d_expert
    row_bytes = llm.hidden_size * precision.activation_bytes  # one token of the residual stream
    stream = (-(-mb.tokens // t) * t if sp else mb.tokens) * row_bytes  # [T_pad, D] or [T, D]
    vae_tokens = mb.vae_images * (mb.vae_pixels // (cfg.vae.downsample * cfg.latent_patch_size)) ** 2  # the 2D expert's
    layers = llm.num_layers // layout.pp
    if sp:  # all-gathers and reduce-scatters, one ring pass each
        passes = collectives = 10 + 3 * recompute
    else:  # all-reduces, two ring passes each; the backward's are issued per expert
        passes, collectives = 2 * (4 + recompute), 6 + recompute
    ring_bytes = float(layers * passes * stream)
    if frozen and not sp:  # the 1D expert's q, k, v are detached (mot.py): no gradient of its attention input to sum
        ring_bytes -= layers * 2 * (mb.tokens - vae_tokens) * row_bytes
        collectives -= 1
    norm_gradients = (1 if frozen else 2) * (2 * llm.qk_norm + 2 * sp + llm.o_bias)  # per trained expert, latency only
    count = layers * (collectives + norm_gradients)
    if stage == 0:
        ring_bytes += 2 * (mb.tokens - mb.vit_tokens - vae_tokens) * row_bytes  # the embedding's all-reduce
        count += 1
    if stage == layout.pp - 1:
        ring_bytes += 2 * mb.ce_tokens * row_bytes  # the LM head input's gradient, all-reduced
        count += 1 + 3  # and the cross-entropy's max, target logit and sum of exponentials
    if sp:  # the decoder input's gradient (first stage) and the decoder output (last stage), all-gathered
        ends = (stage == 0) + (stage == layout.pp - 1)
        ring_bytes += ends * stream
        count += ends
    return TensorParallelTraffic(ring_bytes, count)


def estimate_step(
    shape: ModelShape,
    layout: Layout,
    mb: MicroBatch,
    calibration: Calibration,
    vae_image_flops: float,
    precision: Precision = MIXED_BF16,
    ema: EmaPlacement = "sharded",
    ds: DeepSpeedSettings = DeepSpeedSettings(),
) -> StepEstimate:
    """Predicted seconds of one optimizer step of ``layout`` (see the module docstring)."""
    llm, t, p, m, d = shape.cfg.llm, layout.tp, layout.pp, layout.grad_accum, layout.dp
    b = precision.activation_bytes
    passes = 4.0 if layout.recompute == "full" else 3.0  # forward + backward (+ recomputed forward)
    flops = micro_batch_flops(shape, mb, vae_image_flops, useful=False)
    layers = llm.num_layers // p
    layer_rate = calibration.layer_tflops_at(t) * 1e12
    encoder_rate = calibration.encoder_tflops * 1e12

    def stage_compute(stage: int) -> float:
        """Seconds of one micro-batch's forward + backward on ``stage`` (the VAE encode excluded)."""
        seconds = layers * passes * (
            flops.decoder_linear / t / layer_rate + flops.attention / t / (calibration.attention_tflops * 1e12)
        )
        if stage == 0:
            seconds += passes * flops.vit / encoder_rate
        if stage == p - 1:
            seconds += 3.0 * flops.lm_head / t / layer_rate
        return seconds

    def stage_tp(stage: int) -> float:
        """Seconds of one micro-batch's tensor-parallel collectives on ``stage``."""
        return tensor_parallel_traffic(shape, layout, mb, stage, precision).seconds(t, calibration)

    slowest = max(range(p), key=lambda s: stage_compute(s) + stage_tp(s))
    compute_mb, tp_mb = stage_compute(slowest), stage_tp(slowest)
    encode_mb = flops.vae / encoder_rate  # on every stage, before the schedule starts

    # Pipeline: two blocking transfers per micro-batch and stage.
    p2p_mb = 0.0
    if p > 1:
        cross_node = t * d >= calibration.gpus_per_node
        p2p_bw = calibration.p2p_ib_gbps if cross_node else calibration.p2p_nvlink_gbps
        hidden = mb.tokens * llm.hidden_size * b / (t if layout.sequence_parallel else 1)  # this tp rank's rows
        activations = hidden + mb.tokens * BOUNDARY_METADATA_BYTES
        p2p_mb = (activations + hidden) / (p2p_bw * 1e9)  # forward StageActivations, backward their hidden gradient
    slot = compute_mb + tp_mb + p2p_mb
    bubble = (p - 1) * slot

    # Data parallelism over the busiest stage's gradients.
    trainable = max(shape.stage(s, p).trainable(t) for s in range(p))
    dp_exposed = 0.0
    if d > 1:
        intra_node = t * d <= calibration.gpus_per_node
        busbw = calibration.nvlink_busbw_gbps if intra_node else calibration.ib_busbw_gbps
        latency = (calibration.nvlink_latency_us if intra_node else calibration.ib_latency_us) * 1e-6
        grad_bytes = trainable * precision.grad_bytes
        param_bytes = trainable * precision.param_bytes
        buckets = math.ceil(trainable / ds.reduce_bucket_elements)
        overlap = calibration.overlap if ds.overlap_comm(layout.zero_stage) and p == 1 else 0.0
        gather_buckets = math.ceil(trainable / ds.allgather_bucket_elements)
        gather = _ring_seconds(param_bytes, d, busbw, 1.0) + gather_buckets * latency  # updated weights, after the step
        z = layout.zero_stage
        if z == 0:
            allreduce_buckets = math.ceil(trainable / ds.allreduce_bucket_elements)
            dp_exposed = _ring_seconds(grad_bytes, d, busbw, 2.0) + allreduce_buckets * latency
            if bf16_pipeline_optimizer(layout, precision):
                dp_exposed += gather
        elif z == 1:
            reduce = _ring_seconds(grad_bytes, d, busbw, 1.0) + buckets * latency
            dp_exposed = max(0.0, reduce - overlap * compute_mb * 2 / 3) + gather
        elif z == 2:
            reduce = _ring_seconds(grad_bytes, d, busbw, 1.0) + buckets * latency
            dp_exposed = m * max(0.0, reduce - overlap * compute_mb * 2 / 3) + gather
        else:
            gathers = 2 * _ring_seconds(param_bytes, d, busbw, 1.0)
            reduce = _ring_seconds(grad_bytes, d, busbw, 1.0)
            per_mb = gathers + reduce + 3 * buckets * latency
            dp_exposed = m * max(0.0, per_mb - overlap * compute_mb)

    partitioned = layout.zero_stage >= 1 or bf16_pipeline_optimizer(layout, precision)
    partition = math.ceil(trainable / d) if partitioned else trainable
    bytes_per_param = 32 + (8 if ema != "none" else 0)
    optimizer = partition * bytes_per_param / (calibration.hbm_gbps * 1e9)

    per_mb_useful = training_flops(micro_batch_flops(shape, mb, vae_image_flops, useful=True), llm.num_layers)
    micro_batches = d * m
    return StepEstimate(
        compute_s=m * (compute_mb + encode_mb),
        tp_comm_s=m * tp_mb,
        pp_bubble_s=bubble,
        pp_p2p_s=m * p2p_mb,
        dp_comm_s=dp_exposed,
        optimizer_s=optimizer,
        model_flops=micro_batches * per_mb_useful,
        real_tokens=micro_batches * mb.real_tokens,
    )
