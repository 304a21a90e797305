"""Step-time model: the terms behave as the formulas in timing.py say, and as the engine runs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from modus_mega.config import ModusConfig
from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import Layout
from modus_mega.plan.memory import FP32, MIXED_BF16, MicroBatchTensors, Precision, pipeline_buffers, zero_elements
from modus_mega.plan.shapes import ModelShape
from modus_mega.plan.timing import estimate_step, tensor_parallel_traffic
from modus_mega.plan.workload import MicroBatch, document_mix, micro_batch


@pytest.fixture(scope="module")
def mb(config_7b: ModusConfig) -> MicroBatch:
    return micro_batch(document_mix(config_7b, 128), 16384)


@pytest.mark.parametrize(("pp", "m"), [(2, 1), (4, 8), (7, 16)])
def test_pipeline_bubble_share(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch, pp: int, m: int) -> None:
    # no VAE: its encode runs before the schedule (test_every_stage_encodes_before_the_schedule)
    step = estimate_step(shape_7b, Layout(2, pp, 8, 1, False, "full", 16384, m), mb, h100, vae_image_flops=0.0)
    pipeline = step.compute_s + step.tp_comm_s + step.pp_p2p_s + step.pp_bubble_s
    assert step.pp_bubble_s / pipeline == pytest.approx((pp - 1) / (m + pp - 1))


def test_single_gpu_has_no_communication(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch) -> None:
    step = estimate_step(shape_7b, Layout(1, 1, 1, 0, False, "none", 16384, 4), mb, h100, vae_image_flops=1e12)
    assert step.tp_comm_s == step.dp_comm_s == step.pp_bubble_s == step.pp_p2p_s == 0
    assert step.tokens_per_s_per_gpu(1) == pytest.approx(4 * mb.real_tokens / step.total_s)


def test_full_recompute_adds_one_forward(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch) -> None:
    none, full = (
        estimate_step(shape_7b, Layout(1, 1, 1, 0, False, recompute, 16384, 1), mb, h100, vae_image_flops=0.0)  # type: ignore[arg-type]
        for recompute in ("none", "full")
    )
    head = 3.0 * 2 * shape_7b.cfg.llm.hidden_size * shape_7b.vocab_rows * mb.ce_tokens / (h100.layer_tflops_at(1) * 1e12)
    assert (full.compute_s - head) / (none.compute_s - head) == pytest.approx(4 / 3)
    assert full.model_flops == none.model_flops  # recomputation is not useful work


def test_zero3_gathers_cost_more_than_zero1_without_overlap(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch) -> None:
    no_overlap = replace(h100, overlap=0.0)
    z1, z3 = (
        estimate_step(shape_7b, Layout(4, 1, 64, zero, False, "none", 16384, 4), mb, no_overlap, vae_image_flops=1e12)
        for zero in (1, 3)
    )
    assert z3.dp_comm_s > z1.dp_comm_s > 0
    # ZeRO 3 moves 3 gathers/scatters per micro-batch, ZeRO 1 one scatter and one gather per step.
    assert z3.dp_comm_s / z1.dp_comm_s == pytest.approx(3 * 4 / 2, rel=0.05)


@pytest.mark.parametrize("vit", [True, False], ids=["first-stage-slowest", "last-stage-slowest"])
@pytest.mark.parametrize("pp", [1, 2, 4, 7])
def test_every_stage_encodes_before_the_schedule(
    shape_7b: ModelShape, h100: Calibration, mb: MicroBatch, pp: int, vit: bool
) -> None:
    """training/loop.py: every rank, whatever its stage, encodes its m micro-batches with the frozen VAE
    before the first forward; the stages encode at once, so the step grows by m encodes, the bubble not at all.
    Without ViT patches the first stage has no extra work and the LM head makes the last stage the slowest."""
    mb = mb if vit else replace(mb, vit_tokens=0.0, vit_pairs=0.0)
    m, image_flops = 8, 1e12
    layout = Layout(2, pp, 8, 1, False, "full", 16384, m)
    without, with_vae = (estimate_step(shape_7b, layout, mb, h100, vae_image_flops=f) for f in (0.0, image_flops))
    encode = m * mb.vae_images * image_flops / (h100.encoder_tflops * 1e12)
    assert with_vae.compute_s - without.compute_s == pytest.approx(encode)
    assert with_vae.total_s - without.total_s == pytest.approx(encode)
    assert with_vae.pp_bubble_s == without.pp_bubble_s


def _adam_elements(shape: ModelShape, layout: Layout, precision: Precision) -> int:
    """Elements of each Adam moment the busiest stage's rank steps, by the memory model."""
    return max(zero_elements(shape, layout, stage, precision).optimizer for stage in range(layout.pp))


@pytest.mark.parametrize("precision", [MIXED_BF16, FP32], ids=["bf16", "fp32"])
def test_zero0_pipeline_optimizer_steps_the_memory_models_partition(
    shape_7b: ModelShape, h100: Calibration, mb: MicroBatch, precision: Precision
) -> None:
    """bf16 ZeRO 0 under a pipeline steps through BF16_Optimizer's 1/dp partition; fp32 steps every weight."""
    layout = Layout(4, 2, 8, 0, False, "full", 16384, 8)
    alone = replace(layout, dp=1)  # nothing to partition over
    step, step_alone = (estimate_step(shape_7b, x, mb, h100, 1e12, precision) for x in (layout, alone))
    want = _adam_elements(shape_7b, layout, precision) / _adam_elements(shape_7b, alone, precision)
    assert step.optimizer_s / step_alone.optimizer_s == pytest.approx(want, rel=1e-6)


def test_bf16_zero0_pipeline_all_gathers_the_updated_weights(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch) -> None:
    """BF16_Optimizer all-reduces the bf16 gradients, then all-gathers the bf16 weights of every partition;
    an fp32 pipeline's ZeRO 0 only all-reduces its fp32 gradients (ring volumes, no latency)."""
    no_latency = replace(h100, nvlink_latency_us=0.0, ib_latency_us=0.0)
    layout = Layout(4, 2, 8, 0, False, "full", 16384, 8)  # a dp group spans 32 GPUs: InfiniBand
    bf16, fp32 = (estimate_step(shape_7b, layout, mb, no_latency, 1e12, p) for p in (MIXED_BF16, FP32))
    params = max(shape_7b.stage(stage, layout.pp).trainable(layout.tp) for stage in range(layout.pp))
    per_byte = (layout.dp - 1) / layout.dp / (h100.ib_busbw_gbps * 1e9)  # a ring's share of the message, per byte
    all_reduce, all_gather = 2, 1  # ring passes over the message
    assert bf16.dp_comm_s == pytest.approx(per_byte * (all_reduce * params * 2 + all_gather * params * 2))
    assert fp32.dp_comm_s == pytest.approx(per_byte * all_reduce * params * 4)


def test_stage_boundary_carries_what_the_pipe_buffers_hold(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch) -> None:
    """Forward, each stage sends the StageActivations the memory model (checked against the engine) holds per
    micro-batch in flight; backward, only their hidden states (the one float tensor) get a gradient."""
    layout = Layout(2, 4, 1, 1, False, "full", 16384, 8)  # tp * dp = 2: neighbouring stages share a node
    step = estimate_step(shape_7b, layout, mb, h100, vae_image_flops=1e12)
    middle = pipeline_buffers(shape_7b, layout, MicroBatchTensors.at_peak(shape_7b, mb), 1, MIXED_BF16)
    activations = middle.in_flight / (2 * min(layout.grad_accum, layout.pp - 1))  # received and sent, per micro-batch
    gradient = mb.tokens * shape_7b.cfg.llm.hidden_size * MIXED_BF16.activation_bytes
    want = layout.grad_accum * (activations + gradient) / (h100.p2p_nvlink_gbps * 1e9)
    assert step.pp_p2p_s == pytest.approx(want)


def _tensor_parallel_collectives(shape: ModelShape, layout: Layout, mb: MicroBatch, stage: int) -> list[tuple[int, float]]:
    """(ring passes, message bytes) of every collective one micro-batch issues over tp on ``stage``, one by one,
    as parallel/collectives.py, model/mot.py and model/modus.py make them (bf16 activations, bf16 weights)."""
    llm, t, sp = shape.cfg.llm, layout.tp, layout.sequence_parallel
    all_reduce, all_gather, reduce_scatter = 2, 1, 1
    row = llm.hidden_size * 2  # bytes of one token of the residual stream
    stream = math.ceil(mb.tokens / t) * t * row if sp else mb.tokens * row  # SP pads T to a multiple of tp
    vae_tokens = mb.vae_images * (mb.vae_pixels // 16) ** 2  # FLUX AE /8, 2x2 latent patches
    tokens_per_expert = (mb.tokens - vae_tokens, vae_tokens)  # 1D expert: text, markers, ViT, padding
    out: list[tuple[int, float]] = []
    for _ in range(llm.num_layers // layout.pp):
        for block in ("attention", "mlp"):
            if sp:
                out += [(all_gather, stream), (reduce_scatter, stream)]  # forward: project, reduce
                out += [(all_gather, stream), (all_gather, stream), (reduce_scatter, stream)]  # backward: reduce, _Regathered, project
            else:
                out += [(all_reduce, stream)]  # forward: reduce, both experts at once
                out += [(all_reduce, n * row) for n in tokens_per_expert]  # backward: project's copy, per expert
            if layout.recompute == "full":  # the forward again, up to the last tensor backward needs (before the MLP's reduce)
                if sp:
                    out += [(all_gather, stream)] + ([(reduce_scatter, stream)] if block == "attention" else [])
                elif block == "attention":
                    out += [(all_reduce, stream)]
        for _expert in range(2):  # partial-sum gradients of replicated weights: q_norm, k_norm (+ both layer norms under SP)
            out += [(all_reduce, llm.head_dim * 2)] * 2 + [(all_reduce, row)] * (2 if sp else 0)
    if stage == 0:
        out += [(all_reduce, (mb.tokens - mb.vit_tokens - vae_tokens) * row)]  # vocab-parallel embedding, text rows
        out += [(all_gather, stream)] if sp else []  # backward of the decoder input's scatter
    if stage == layout.pp - 1:
        out += [(all_gather, stream)] if sp else []  # the decoder output, gathered for the heads
        out += [(all_reduce, mb.ce_tokens * row)]  # backward of the LM head's copy
        out += [(all_reduce, mb.ce_tokens * 4)] * 3  # vocab-parallel cross-entropy: max, target logit, sum of exps
    return out


@pytest.mark.parametrize("recompute", ["none", "full"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("pp", [1, 2])
def test_tensor_parallel_traffic_counted_from_first_principles(
    shape_7b: ModelShape, h100: Calibration, mb: MicroBatch, pp: int, sp: bool, recompute: str
) -> None:
    """Each collective's ring time at NVLink bus bandwidth plus its latency, summed, is what the model charges a stage
    (it leaves out the bytes of the norm-gradient and cross-entropy vectors, under 1e-4 of the total)."""
    mb = replace(mb, tokens=16383)  # not a multiple of tp: SP pads
    layout = Layout(4, pp, 8, 1, sp, recompute, mb.tokens, 4)  # type: ignore[arg-type]
    for stage in range(pp):
        collectives = _tensor_parallel_collectives(shape_7b, layout, mb, stage)
        ring = sum(passes * message for passes, message in collectives) * (layout.tp - 1) / layout.tp
        want = ring / (h100.nvlink_busbw_gbps * 1e9) + len(collectives) * h100.nvlink_latency_us * 1e-6
        traffic = tensor_parallel_traffic(shape_7b, layout, mb, stage)
        assert traffic.collectives == len(collectives)
        assert traffic.seconds(layout.tp, h100) == pytest.approx(want, rel=1e-4)
    if pp == 1:
        step = estimate_step(shape_7b, layout, mb, h100, vae_image_flops=1e12)
        assert step.tp_comm_s == pytest.approx(layout.grad_accum * want, rel=1e-4)


def test_sequence_parallel_moves_a_quarter_more_than_plain_tp(shape_7b: ModelShape, mb: MicroBatch) -> None:
    """Per layer, ring passes over [T, D]: plain TP 4 all-reduces (8), SP 6 all-gathers + 4 reduce-scatters (10);
    recomputation adds 1 all-reduce (2) or 2 all-gathers + 1 reduce-scatter (3)."""
    for recompute, ratio in (("none", 10 / 8), ("full", 13 / 10)):
        plain, sp = (
            tensor_parallel_traffic(shape_7b, Layout(4, 1, 8, 1, s, recompute, mb.tokens, 1), mb, 0).ring_bytes  # type: ignore[arg-type]
            for s in (False, True)
        )
        assert sp / plain == pytest.approx(ratio, rel=0.01)
