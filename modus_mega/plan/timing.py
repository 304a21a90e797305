"""Step time of one layout: compute at calibrated rates, communication, pipeline bubble.

Compute, per micro-batch and GPU of the slowest pipeline stage (FLOPs over the
calibrated achieved TFLOP/s of each kind of work; t = tp):

- decoder linears: ``2 * W * T / t`` forward, W = one expert's linear weights per layer
  (each token multiplies ONE expert: MoT), T = the token budget (padding runs too);
- attention: ``4 * Hq * head_dim * pairs / t`` forward, ``pairs`` = (query, key) pairs the
  MODUS mask allows (``workload.visible_pairs``: causal prefixes, whole full splits,
  noise splits seen only from inside), not T^2;
- backward = 2x forward; ``recompute = "full"`` adds one more forward;
- first stage: the ViT (fwd + bwd, replicated on every tp rank) and the frozen VAE
  encoder (forward only, counted with ``FlopCounterMode`` on the meta device);
- last stage: the LM head at the positions that carry a CE loss only.

Communication (ring collectives: an all-reduce moves ``2 (n-1)/n`` of the message per
GPU at NCCL's bus bandwidth, a reduce-scatter or all-gather ``(n-1)/n``):

- **TP** (NVLink, never overlapped: Megatron-core without Transformer Engine's
  userbuffers): per layer and micro-batch two all-reduces of ``[T, D]`` forward and two
  backward (two more with recompute); sequence parallelism swaps each for a
  reduce-scatter + all-gather pair of the same volume. MoT issues each per expert, so
  the latency term counts two collectives per all-reduce.
- **PP**: the 1F1B schedule runs ``m + p - 1`` slots of the slowest stage, each slot one
  micro-batch's forward + backward + its two blocking activation transfers (over NVLink
  when a stage's neighbour is on the same node, else InfiniBand); the bubble is the
  ``(p - 1) / (m + p - 1)`` share.
- **DP** (InfiniBand once a dp group leaves the node; bf16 gradients): ZeRO 0
  all-reduces after the last backward; ZeRO 1 reduce-scatters then, and all-gathers the
  updated weights after the step; ZeRO 2 reduce-scatters after every micro-batch's
  backward; ZeRO 3 all-gathers the weights in every forward and backward and
  reduce-scatters every backward. Only DeepSpeed's ``overlap_comm`` (default: ZeRO 3
  only) hides a collective, behind ``calibration.overlap`` of the compute it runs under;
  with pp > 1 DeepSpeed reduces after the pipeline flush, exposed.
- **Optimizer**: Adam over this GPU's partition is HBM bound (about 32 bytes moved per
  parameter, 8 more with EMA on the partition).

MFU counts useful model FLOPs (real tokens, no recompute, no padding; the ViT and the VAE
once per micro-batch, not once per tp rank) over ``step time * GPUs * peak``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import EmaPlacement, Layout
from modus_mega.plan.memory import MIXED_BF16, DeepSpeedSettings, Precision
from modus_mega.plan.shapes import ModelShape
from modus_mega.plan.workload import MicroBatch

_METADATA_BYTES_PER_TOKEN = 40  # per-token ids, positions, lo/hi, token types travelling with the hidden states


@dataclass(frozen=True)
class StepEstimate:
    """Seconds of one optimizer step by term, and what the step achieves."""

    compute_s: float  # m micro-batches of forward + backward (+ recompute) on the slowest stage
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

    def stage_compute(stage: int) -> float:
        seconds = layers * passes * (
            flops.decoder_linear / t / layer_rate + flops.attention / t / (calibration.attention_tflops * 1e12)
        )
        if stage == 0:
            seconds += (passes * flops.vit + flops.vae) / (calibration.encoder_tflops * 1e12)
        if stage == p - 1:
            seconds += 3.0 * flops.lm_head / t / layer_rate
        return seconds

    compute_mb = max(stage_compute(s) for s in range(p))

    # Tensor parallelism: all-reduces of [T, D] activations inside the node.
    tp_mb = 0.0
    if t > 1:
        per_layer = 6 if layout.recompute == "full" else 4
        hidden_bytes = mb.tokens * llm.hidden_size * b
        collectives = layers * per_layer
        tp_mb = collectives * _ring_seconds(hidden_bytes, t, calibration.nvlink_busbw_gbps, 2.0)
        tp_mb += collectives * 2 * (2 if layout.sequence_parallel else 1) * calibration.nvlink_latency_us * 1e-6
        tp_mb += _ring_seconds(hidden_bytes, t, calibration.nvlink_busbw_gbps, 2.0)  # vocab-parallel embedding

    # Pipeline: two blocking transfers per micro-batch and stage.
    p2p_mb = 0.0
    if p > 1:
        cross_node = t * d >= calibration.gpus_per_node
        p2p_bw = calibration.p2p_ib_gbps if cross_node else calibration.p2p_nvlink_gbps
        message = mb.tokens * (llm.hidden_size * b / (t if layout.sequence_parallel else 1) + _METADATA_BYTES_PER_TOKEN)
        p2p_mb = 2 * message / (p2p_bw * 1e9)
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
        z = layout.zero_stage
        if z == 0:
            dp_exposed = _ring_seconds(grad_bytes, d, busbw, 2.0) + buckets * latency
        elif z == 1:
            reduce = _ring_seconds(grad_bytes, d, busbw, 1.0) + buckets * latency
            dp_exposed = max(0.0, reduce - overlap * compute_mb * 2 / 3)
            dp_exposed += _ring_seconds(param_bytes, d, busbw, 1.0) + buckets * latency
        elif z == 2:
            reduce = _ring_seconds(grad_bytes, d, busbw, 1.0) + buckets * latency
            dp_exposed = m * max(0.0, reduce - overlap * compute_mb * 2 / 3)
            dp_exposed += _ring_seconds(param_bytes, d, busbw, 1.0) + buckets * latency
        else:
            gathers = 2 * _ring_seconds(param_bytes, d, busbw, 1.0)
            reduce = _ring_seconds(grad_bytes, d, busbw, 1.0)
            per_mb = gathers + reduce + 3 * buckets * latency
            dp_exposed = m * max(0.0, per_mb - overlap * compute_mb)

    partition = math.ceil(trainable / d) if layout.zero_stage >= 1 else trainable
    bytes_per_param = 32 + (8 if ema != "none" else 0)
    optimizer = partition * bytes_per_param / (calibration.hbm_gbps * 1e9)

    per_mb_useful = training_flops(micro_batch_flops(shape, mb, vae_image_flops, useful=True), llm.num_layers)
    micro_batches = d * m
    return StepEstimate(
        compute_s=m * compute_mb,
        tp_comm_s=m * tp_mb,
        pp_bubble_s=bubble,
        pp_p2p_s=m * p2p_mb,
        dp_comm_s=dp_exposed,
        optimizer_s=optimizer,
        model_flops=micro_batches * per_mb_useful,
        real_tokens=micro_batches * mb.real_tokens,
    )
