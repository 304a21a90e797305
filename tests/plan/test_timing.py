"""Step-time model: the terms behave as the formulas in timing.py say."""

from __future__ import annotations

import pytest

from modus_mega.config import ModusConfig
from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import Layout
from modus_mega.plan.shapes import ModelShape
from modus_mega.plan.timing import estimate_step
from modus_mega.plan.workload import MicroBatch, document_mix, micro_batch


@pytest.fixture(scope="module")
def mb(config_7b: ModusConfig) -> MicroBatch:
    return micro_batch(document_mix(config_7b, 128), 16384)


@pytest.mark.parametrize(("pp", "m"), [(2, 1), (4, 8), (7, 16)])
def test_pipeline_bubble_share(shape_7b: ModelShape, h100: Calibration, mb: MicroBatch, pp: int, m: int) -> None:
    step = estimate_step(shape_7b, Layout(2, pp, 8, 1, False, "full", 16384, m), mb, h100, vae_image_flops=1e12)
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
    from dataclasses import replace

    no_overlap = replace(h100, overlap=0.0)
    z1, z3 = (
        estimate_step(shape_7b, Layout(4, 1, 64, zero, False, "none", 16384, 4), mb, no_overlap, vae_image_flops=1e12)
        for zero in (1, 3)
    )
    assert z3.dp_comm_s > z1.dp_comm_s > 0
    # ZeRO 3 moves 3 gathers/scatters per micro-batch, ZeRO 1 one scatter and one gather per step.
    assert z3.dp_comm_s / z1.dp_comm_s == pytest.approx(3 * 4 / 2, rel=0.05)
