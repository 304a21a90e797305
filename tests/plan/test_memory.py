"""Memory model: exact bytes against torch and saved tensors; DeepSpeed's estimators; invariants.

The engine's ZeRO-sharded allocations per rank are checked in ``test_memory_engine.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from modus_mega.config import ModusConfig
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.layers import SERIAL_LINEARS, LinearFactory, rope_cos_sin
from modus_mega.model.modus import ModusModel
from modus_mega.model.mot import LayerContext, MoTLayer, ShardRows
from modus_mega.ops.attention import AttentionBackend
from modus_mega.parallel.collectives import SequenceParallelCollectives
from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import Layout
from modus_mega.plan.memory import (
    FP32,
    MIXED_BF16,
    DeepSpeedSettings,
    decoder_layer_bytes_per_token,
    engine_buffers,
    estimate_memory,
    flat_numel,
    model_states,
    reduce_buckets,
    step_transient,
    vit_bytes_per_patch,
    zero12_gradient_elements,
    zero_elements,
)
from modus_mega.plan.shapes import ModelShape, model_shape
from modus_mega.plan.workload import document_mix, micro_batch


def _layout(tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, sp: bool = False, recompute: str = "none") -> Layout:
    return Layout(tp, pp, dp, zero, sp, recompute, token_budget=16384, grad_accum=4)  # type: ignore[arg-type]


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("freeze_1d_expert", [False, True])
def test_model_states_equal_torch_allocations(tiny_config: ModusConfig, freeze_1d_expert: bool) -> None:
    """tp = 1, no ZeRO, fp32 CPU training: weights, gradients and AdamW state, byte for byte."""
    tiny_config.model.llm.freeze_1d_expert = freeze_1d_expert
    model, vae = ModusModel(tiny_config.model), FluxAutoEncoder(tiny_config.model.vae)
    vae.requires_grad_(False)
    if freeze_1d_expert:  # what training/engine.py build_model does
        for layer in model.layers:
            layer.experts[0].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()

    predicted = model_states(model_shape(tiny_config.model), _layout(), stage=0, precision=FP32, ema="none")
    assert predicted.weights == _bytes(model.parameters()) + _bytes(vae.parameters())
    assert predicted.gradients == _bytes(p.grad for p in params)
    assert predicted.optimizer_states == _bytes(t for s in optimizer.state.values() for t in s.values())
    assert predicted.master_weights == 0 and predicted.ema == 0


def _trainable_state_bytes(shape: ModelShape, layout: Layout) -> int:
    """GPU model states of the trainable tensors on the rank holding the most (frozen weights and the VAE left out)."""
    e, b = zero_elements(shape, layout, 0, MIXED_BF16), MIXED_BF16
    return e.weights * b.param_bytes + e.gradients * b.grad_bytes + e.master * b.master_bytes + e.optimizer * b.optimizer_bytes


@pytest.mark.parametrize("gpus", [8, 64, 256])
def test_zero2_is_deepspeeds_estimate_plus_padding_and_whole_tensor_gradients(shape_7b: ModelShape, gpus: int) -> None:
    """DeepSpeed's estimate (2P + 18P/N) is the ideal 1/N split; the engine pads the flat buffer to F
    and reduces the gradients of the tensors that straddle a rank's range whole (G elements)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    sizes = tuple(t.numel for t in shape_7b.tensors if t.trainable)
    params = sum(sizes)
    flat = flat_numel(params, gpus)
    partition, gradients = flat // gpus, max(zero12_gradient_elements(sizes, gpus))
    _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(params, 8, gpus // 8, cpu_offload=False)
    ours = _trainable_state_bytes(shape_7b, _layout(dp=gpus, zero=2)) + 4 * partition  # + the step's fp32 gradients
    # bf16 weights 2(F - P), fp32 gradients + master + Adam 16(F/N - P/N), bf16 gradients 2(G - P/N)
    extra = 2 * (flat - params) + 16 * (partition - params / gpus) + 2 * (gradients - params / gpus)
    assert ours - deepspeed_gpu == pytest.approx(extra, abs=1)  # DeepSpeed rounds 18P/N down
    assert flat - params < 2 * gpus and gradients - partition <= 2 * max(sizes)  # at most two straddling tensors


@pytest.mark.parametrize("gpus", [8, 256])
def test_zero3_is_deepspeeds_estimate_plus_gradient_partition_padding_and_persistent_tensors(
    shape_7b: ModelShape, gpus: int
) -> None:
    """DeepSpeed's estimate (18P/N + 4 bytes per element of the largest layer) leaves out the bf16
    gradient partition and the tensors kept whole, splits without per-tensor padding, and counts the
    gathered largest layer, which the model counts among the engine buffers."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    sizes = tuple(t.numel for t in shape_7b.tensors if t.trainable)
    params, largest = sum(sizes), shape_7b.largest_tensor(1)
    layout = _layout(dp=gpus, zero=3)
    e = zero_elements(shape_7b, layout, 0, MIXED_BF16)
    partition, persistent = e.master, e.weights - e.master
    _, deepspeed_gpu, largest_layer = estimate_zero3_model_states_mem_needs(
        params, largest, 8, gpus // 8, cpu_offload=False, cpu_offload_params=False
    )
    ours = _trainable_state_bytes(shape_7b, layout) + 4 * partition  # + the step's fp32 gradients
    # gathered persistent tensors (bf16), the bf16 gradient partition, per-tensor padding of the 18 bytes
    extra = 2 * persistent + 2 * partition + 18 * (partition - params / gpus)
    assert ours - (deepspeed_gpu - largest_layer) == pytest.approx(extra, abs=1)
    assert 0 < persistent < 2e-4 * params  # norms and biases: negligible at 7B
    ds = DeepSpeedSettings()
    gathered = engine_buffers(shape_7b, layout, MIXED_BF16, ds) - reduce_buckets(layout, MIXED_BF16, ds)
    assert gathered - ds.prefetch_bucket_elements * MIXED_BF16.param_bytes == largest_layer


@pytest.mark.parametrize("zero", [0, 1])
def test_pipeline_stages_are_deepspeeds_zero2_estimate_of_their_parameters_plus_the_gradients_kept_whole(
    shape_7b: ModelShape, zero: int
) -> None:
    """DeepSpeed estimates ZeRO 2 and 3 only, which its pipeline engine refuses. Given one stage's
    parameters P and its dp ranks N, the ZeRO 2 estimate (2P + 18P/N) still holds what a bf16 stage
    keeps at ZeRO 1, and at ZeRO 0 (whose BF16_Optimizer partitions like ZeRO 1), but for the bf16
    gradients they keep whole (ZeRO 1: P; ZeRO 0: P plus its flat accumulation buffer F, not P/N)
    and the flat buffer's padding."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    b = MIXED_BF16
    for pp, dp in ((2, 8), (4, 64)):
        layout = _layout(pp=pp, dp=dp, zero=zero)
        for stage in range(pp):
            params = sum(t.numel for t in shape_7b.stage_tensors(stage, pp) if t.trainable)
            flat = flat_numel(params, dp)
            e = zero_elements(shape_7b, layout, stage, b)
            ours = e.weights * b.param_bytes + e.gradients * b.grad_bytes + e.master * b.master_bytes
            ours += e.optimizer * b.optimizer_bytes + 4 * e.master  # + the step's fp32 gradient partition
            _, deepspeed_gpu = estimate_zero2_model_states_mem_needs(params, dp, 1, cpu_offload=False)
            whole = params + (flat if zero == 0 else 0)  # bf16 gradient elements kept unpartitioned
            extra = 2 * (flat - params) + 16 * (flat - params) / dp + 2 * (whole - params / dp)
            assert ours - deepspeed_gpu == pytest.approx(extra, abs=1), (pp, dp, stage)  # DeepSpeed rounds 18P/N down


def test_zero12_gradient_buffers_equal_an_element_by_element_count() -> None:
    """Whole tensors overlapping each rank's range, and zeros for its padding, counted the slow way."""
    for sizes, dp in [((5, 3, 8, 1, 7), 2), ((5, 3, 8, 1, 7), 4), ((1, 1, 1), 4), ((30, 2, 2), 3), ((9,), 8)]:
        flat = flat_numel(sum(sizes), dp)
        owner = [i for i, n in enumerate(sizes) for _ in range(n)] + [None] * (flat - sum(sizes))  # element -> tensor
        partition = flat // dp
        expected = []
        for rank in range(dp):
            span = owner[rank * partition : (rank + 1) * partition]
            tensors = {i for i in span if i is not None}
            expected.append(sum(sizes[i] for i in tensors) + span.count(None))
        assert zero12_gradient_elements(sizes, dp) == tuple(expected), (sizes, dp)


def test_step_transient_is_the_flat_gradient_partition_its_fp32_copy_and_the_gather_bucket(shape_7b: ModelShape) -> None:
    ds = DeepSpeedSettings()
    partition = flat_numel(shape_7b.total().trainable(1), 64) // 64
    layout = _layout(dp=64, zero=1)
    assert step_transient(shape_7b, layout, 0, MIXED_BF16, ds) == partition * (2 + 4) + ds.allgather_bucket_elements * 2
    assert step_transient(shape_7b, layout, 0, FP32, ds) == partition * 4 + ds.allgather_bucket_elements * 4


def test_deepspeed_settings_match_the_engine_config(tiny_config: ModusConfig) -> None:
    """The planner's buffers assume DeepSpeed's defaults; fail when training/engine.py changes them."""
    from modus_mega.training.engine import deepspeed_config

    defaults = {
        "reduce_bucket_size": DeepSpeedSettings().reduce_bucket_elements,
        "allgather_bucket_size": DeepSpeedSettings().allgather_bucket_elements,
        "stage3_prefetch_bucket_size": DeepSpeedSettings().prefetch_bucket_elements,
        "sub_group_size": DeepSpeedSettings().sub_group_elements,
        "stage3_param_persistence_threshold": DeepSpeedSettings().persistence_threshold,
    }
    for stage in range(4):
        tiny_config.parallel.zero_stage = stage
        zero = deepspeed_config(tiny_config, SimpleNamespace(dp=1, device=torch.device("cpu")))["zero_optimization"]
        for key, value in zero.items():
            if key == "overlap_comm":
                assert value == DeepSpeedSettings().overlap_comm(stage), "update DeepSpeedSettings.overlap_comm"
            elif key != "stage":
                assert defaults.get(key) == value, f"training/engine.py sets {key}={value}; mirror it in DeepSpeedSettings"


class _FlashLikeAttention(AttentionBackend):
    """Dense attention that saves for backward exactly what a flash kernel saves: q, k, v, out, lse."""

    def prepare(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return lo, hi

    def forward(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, scale: float) -> Tensor:
        return _FlashLike.apply(q, k, v, scale)


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:  # q [T, Hq, Dh], k/v [T, Hkv, Dh]
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
        scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
        lse = scores.logsumexp(-1)  # [Hq, T]
        out = torch.einsum("hqk,khd->qhd", (scores - lse[..., None]).exp(), vv).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        raise NotImplementedError("forward-only test double")


def _layer_context(llm: Any, tokens: int, shard: ShardRows | None = None) -> LayerContext:
    """A micro-batch of ``tokens`` where a third use the 2D expert, each token attending itself."""
    expert_ids = (torch.arange(tokens) % 3 == 0).long()
    index, unpermute = LayerContext.route(expert_ids)
    cos, sin = rope_cos_sin(torch.arange(tokens), llm.head_dim, llm.rope_theta, torch.bfloat16)
    backend = _FlashLikeAttention()
    lo = torch.arange(tokens, dtype=torch.int32)
    return LayerContext(index, unpermute, cos, sin, backend, backend.prepare(lo, lo + 1), shard)


def _saved_bytes(layer: MoTLayer, x: Tensor, ctx: LayerContext) -> int:
    """Bytes autograd keeps for backward after ``layer(x, ctx)``: weights and the shared context excluded.

    Counted once the forward is over, so a storage freed by then (sequence parallelism's
    gathered tokens, rebuilt in backward) counts zero.
    """
    context = [ctx.cos, ctx.sin, ctx.unpermute, *ctx.expert_index, ctx.shard.unpermute, *ctx.shard.expert_index]
    excluded = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *context]}
    saved: dict[int, torch.UntypedStorage] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, ctx)
    return sum(storage.nbytes() for storage in saved.values())


def test_decoder_layer_activations_equal_saved_tensors(tiny_config: ModusConfig) -> None:
    """Bytes autograd keeps for one MoT layer (bf16) = the formula, exactly (weights and shared context excluded)."""
    llm = tiny_config.model.llm
    tokens = 96
    layer = MoTLayer(llm, SERIAL_LINEARS).to(torch.bfloat16)
    x = torch.randn(tokens, llm.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    shape = model_shape(tiny_config.model)
    expected = decoder_layer_bytes_per_token(shape, _layout(), MIXED_BF16) * tokens
    assert _saved_bytes(layer, x, _layer_context(llm, tokens)) == expected


class _OneRankOfTwo(SequenceParallelCollectives):
    """Sequence parallelism as tp rank 0 of 2 sees it, in one process: the other rank's rows are copies of ours.

    The values are not the real ones; the shapes, and so the saved bytes, are.
    """

    def __init__(self) -> None:
        self.group, self.num_shards, self.shard = None, 2, 0

    def all_gather(self, rows: Tensor) -> Tensor:
        return rows.repeat(2, 1)

    def reduce_scatter(self, full: Tensor) -> Tensor:
        return full[: full.shape[0] // 2] + full[full.shape[0] // 2 :]


def test_sequence_parallel_decoder_layer_activations_equal_saved_tensors(tiny_config: ModusConfig) -> None:
    """With sequence parallelism at tp = 2 one rank keeps the formula's bytes, exactly: its norms and
    residual rows are half the sequence, and the gathered tokens its linears saved are freed until backward."""
    llm, tp = tiny_config.model.llm, 2
    tokens = 96
    collectives = _OneRankOfTwo()
    linears = LinearFactory(
        column=lambda i, o, bias: nn.Linear(i, o // tp, bias=bias),
        row=lambda i, o, bias: nn.Linear(i // tp, o, bias=bias),
        embedding=nn.Embedding,
        tp_size=tp,
        collectives=collectives,
    )
    layer = MoTLayer(llm, linears).to(torch.bfloat16)
    shard = ShardRows.of((torch.arange(tokens) % 3 == 0).long(), tp, collectives.shard)
    x = torch.randn(tokens // tp, llm.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    shape = model_shape(tiny_config.model)
    expected = decoder_layer_bytes_per_token(shape, _layout(tp=tp, sp=True), MIXED_BF16) * tokens
    assert _saved_bytes(layer, x, _layer_context(llm, tokens, shard)) == expected


def _sweep_layouts(config: ModusConfig) -> list[Layout]:
    layers = config.model.llm.num_layers
    layouts = []
    for tp in (1, 2, 4):
        for pp in (p for p in (1, 2, 4, 7) if layers % p == 0):
            for zero in (0, 1) if pp > 1 else (0, 1, 2, 3):
                for sp in (False, True) if tp > 1 else (False,):
                    for recompute in ("none", "full"):
                        layouts.append(_layout(tp, pp, 1, zero, sp, recompute))
    return layouts


def test_more_gpus_never_predict_more_memory(config_7b: ModusConfig, shape_7b: ModelShape, h100: Calibration) -> None:
    mb = micro_batch(document_mix(config_7b, 128), 16384)
    for base in _sweep_layouts(config_7b):
        peaks = [
            estimate_memory(shape_7b, Layout(**{**base.__dict__, "dp": dp}), mb, h100).peak
            for dp in (1, 2, 4, 8, 16, 64, 256, 1024)
        ]
        assert all(a >= b for a, b in zip(peaks, peaks[1:])), (base.describe(), peaks)


def test_zero_stages_never_add_memory(config_7b: ModusConfig, shape_7b: ModelShape, h100: Calibration) -> None:
    """Model states shrink stage by stage at any dp; the peak too once dp outweighs the engine's buckets."""
    mb = micro_batch(document_mix(config_7b, 128), 16384)
    for dp in (1, 2, 8, 64, 512):
        for tp in (1, 4):
            layouts = [_layout(tp=tp, dp=dp, zero=z) for z in range(4)]
            states = [model_states(shape_7b, layout, 0).total for layout in layouts]
            assert states == sorted(states, reverse=True), (dp, tp, states)
            if dp >= 8:
                peaks = [estimate_memory(shape_7b, layout, mb, h100).peak for layout in layouts]
                assert peaks == sorted(peaks, reverse=True), (dp, tp, peaks)


def _flash_like_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA stand-in over [H, n, Dh] that saves what a flash kernel saves (see _FlashLike)."""
    out = _FlashLike.apply(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), q.shape[-1] ** -0.5)
    return out.transpose(0, 1)


def test_vit_activations_equal_saved_tensors(tiny_config: ModusConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes autograd keeps for the ViT and connector per patch (bf16, flash-style attention) = the formula."""
    import modus_mega.encoders.vit as vit_module
    from modus_mega.model.embeddings import MLPConnector

    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", _flash_like_sdpa)
    cfg = tiny_config.model
    vit = vit_module.SiglipNaViT(cfg.vit).to(torch.bfloat16)
    connector = MLPConnector(cfg.vit.hidden_size, cfg.llm.hidden_size).to(torch.bfloat16)
    side = cfg.vit.max_patches_per_side
    patches = side * side  # one image
    position_ids = torch.arange(patches)
    cu_seqlens = torch.tensor([0, patches], dtype=torch.int32)
    pixels = torch.randn(patches, vit.patch_dim, dtype=torch.bfloat16)

    excluded = {t.untyped_storage().data_ptr() for t in [*vit.parameters(), *connector.parameters(), pixels, position_ids]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in excluded:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        connector(vit(pixels, position_ids, cu_seqlens))
    shape = model_shape(cfg)
    # The CPU path differs from the GPU one the formula describes in two known ways: it
    # concatenates the per-image attention outputs (one more [n, d] bf16 copy per layer), and
    # CPU LayerNorm keeps mean and rstd in bf16 (2 + 2 bytes instead of fp32's 4 + 4).
    layers, d, b = cfg.vit.num_layers_used, cfg.vit.hidden_size, MIXED_BF16.activation_bytes
    cpu_difference = layers * b * d - (2 * layers + 1) * 4
    expected = (vit_bytes_per_patch(shape, _layout(), MIXED_BF16) + cpu_difference) * patches
    assert sum(saved.values()) == expected
