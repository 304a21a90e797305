"""Attention backends against an independent dense fp64 softmax attention (DESIGN §4)."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from modus_mega.ops.attention import (
    attention,
    choose_attention_backend,
    get_attention_backend,
)
from modus_mega.ops.attention_flex import (
    FlexAttention,
    block_mask_from_lo_hi,
    classify_tiles,
    lo_hi_mask_mod,
)
from modus_mega.ops.attention_reference import (
    ReferenceAttention,
    group_blocks,
    reference_attention_with_lse,
)
from modus_mega.ops.mask import (
    cache_boundaries,
    dense_mask_from_layout,
    dense_mask_from_lo_hi,
    layout_num_tokens,
    lo_hi_for_layout,
    padding_lo_hi,
    sample_random_layout,
)

# The CPU flex path is the eager one on purpose; its advice to compile is expected.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------- helpers


def _micro_batch(
    rng: random.Random, max_run_length: int = 12, max_samples: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lo, hi of a random layout plus random padding, and the oracle mask (no lo/hi used)."""
    layout = sample_random_layout(rng, max_samples=max_samples, max_run_length=max_run_length)
    num_real = layout_num_tokens(layout)
    num_padding = rng.choice([0, 0, 1, 3])
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(num_real, num_padding)
    total = num_real + num_padding
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:num_real, :num_real] = dense_mask_from_layout(layout)
    allowed[num_real:, num_real:] = torch.eye(num_padding, dtype=torch.bool)
    return torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi]), allowed


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """Textbook masked softmax attention in float64 with repeat_interleave GQA: [T, Hq, D]."""
    group = q.shape[1] // k.shape[1]
    k_full = k.double().repeat_interleave(group, dim=1)  # [T, Hq, D]
    v_full = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k_full) * scale  # [Hq, T, T]
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v_full)


def _qkv(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(num_tokens, num_q_heads, head_dim), *[(num_tokens, num_kv_heads, head_dim)] * 2]
    return tuple(
        torch.randn(shape, generator=generator, dtype=torch.float64)
        .to(device, dtype)
        .requires_grad_()
        for shape in shapes
    )


def _grads(out: torch.Tensor, cotangent: torch.Tensor, *inputs: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, inputs, cotangent)


# ----------------------------------------------------------------------------- reference


GQA_CASES = [(group, head_dim) for group in (1, 2, 7) for head_dim in (16, 64)]


@pytest.mark.parametrize(("group", "head_dim"), GQA_CASES)
def test_reference_matches_dense_attention_forward_and_backward(group: int, head_dim: int) -> None:
    rng = random.Random(1000 * group + head_dim)
    for case in range(40):
        lo, hi, allowed = _micro_batch(rng)
        num_tokens = lo.shape[0]
        num_kv_heads = rng.choice([1, 2])
        q, k, v = _qkv(
            num_tokens, num_kv_heads * group, num_kv_heads, head_dim, torch.float64, case
        )
        scale = rng.choice([1 / math.sqrt(head_dim), 0.3])
        backend = ReferenceAttention(max_group_tokens=rng.choice([1, 7, 1024]))

        out = backend.forward(q, k, v, backend.prepare(lo, hi), scale)
        expected = _dense_attention(q, k, v, allowed, scale)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

        cotangent = torch.randn_like(expected)
        for got, want in zip(_grads(out, cotangent, q, k, v), _grads(expected, cotangent, q, k, v)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_keeps_the_input_dtype_and_computes_in_fp32(dtype: torch.dtype) -> None:
    rng = random.Random(7)
    lo, hi, allowed = _micro_batch(rng, max_run_length=20)
    q, k, v = _qkv(lo.shape[0], 4, 2, 32, dtype, seed=3)
    out = attention(q, k, v, lo, hi, backend="reference")
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    # fp32 math on the (rounded) inputs: only the final cast to dtype may differ.
    expected = _dense_attention(q, k, v, allowed, 1 / math.sqrt(32)).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


def test_reference_lse_is_the_log_sum_exp_of_the_allowed_scores() -> None:
    rng = random.Random(11)
    for case in range(20):
        lo, hi, allowed = _micro_batch(rng)
        q, k, v = _qkv(lo.shape[0], 6, 3, 16, torch.float32, seed=case)
        out, lse = reference_attention_with_lse(q, k, v, lo, hi, scale=0.2)
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
        scores = (
            torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(2, dim=1)) * 0.2
        )  # [Hq, T, T]
        expected = torch.logsumexp(scores.masked_fill(~allowed, -math.inf), dim=-1).T  # [T, Hq]
        torch.testing.assert_close(lse.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.double(), _dense_attention(q, k, v, allowed, 0.2), rtol=1e-5, atol=1e-5
        )


def test_reference_survives_rows_that_see_no_key() -> None:
    # Keys 0..2 are visible to nobody (lo = hi) and keys 3..5 only to queries 3..5,
    # so query rows 0..2 see no key.
    lo = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    hi = torch.tensor([0, 1, 2, 6, 5, 6], dtype=torch.int32)
    q, k, v = _qkv(6, 2, 1, 16, torch.float32, seed=0)
    out, lse = reference_attention_with_lse(q, k, v, lo, hi)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert torch.isneginf(lse[:3]).all() and torch.isfinite(lse[3:]).all()
    assert torch.isfinite(out).all()
    grads = _grads(out, torch.ones_like(out), q, k, v)
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert torch.equal(grads[0][:3], torch.zeros_like(grads[0][:3]))


def test_small_independent_ranges_are_merged_into_bounded_groups() -> None:
    assert group_blocks([(0, 3), (3, 5), (5, 6), (6, 10), (10, 11)], 5) == [
        (0, 5),
        (5, 10),
        (10, 11),
    ]
    assert group_blocks([(0, 9), (9, 10), (10, 11)], 5) == [
        (0, 9),
        (9, 11),
    ]  # a big range stays alone
    # A 100-token document followed by 500 padding tokens: one group, not 501 iterations.
    lo, hi = lo_hi_for_layout([[("causal", 60), ("full", 40)]])
    pad_lo, pad_hi = padding_lo_hi(100, 500)
    plan = ReferenceAttention().prepare(torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi]))
    assert plan.group_sizes == (600,)
    plan = ReferenceAttention(max_group_tokens=256).prepare(
        torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi])
    )
    assert plan.group_sizes == (256, 256, 88)


def test_reference_rejects_lo_hi_outside_the_sequence() -> None:
    lo = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="key 1 has lo=1, hi=3"):
        ReferenceAttention().prepare(lo, torch.tensor([2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="key 0 has lo=0, hi=-1"):
        ReferenceAttention().prepare(lo, torch.tensor([-1, 2], dtype=torch.int32))


def test_noise_splits_leak_nothing() -> None:
    """Changing a noise split's K/V changes no output outside it; their grads from outside are 0."""
    rng = random.Random(5)
    checked = 0
    while checked < 60:
        layout = sample_random_layout(rng)
        noise_splits, position = [], 0
        for sample in layout:
            for mode, length in sample:
                if mode == "noise":
                    noise_splits.append((position, position + length))
                position += length
        if not noise_splits:
            continue
        start, end = rng.choice(noise_splits)
        lo, hi = lo_hi_for_layout(layout)
        q, k, v = _qkv(position, 4, 2, 16, torch.float32, seed=checked)
        outside = torch.ones(position, dtype=torch.bool)
        outside[start:end] = False

        for backend in ("reference", "flex"):
            with torch.no_grad():
                out = attention(q, k, v, lo, hi, backend=backend)
                k_changed, v_changed = k.clone(), v.clone()
                k_changed[start:end] += 10 * torch.randn_like(k_changed[start:end])
                v_changed[start:end] += 10 * torch.randn_like(v_changed[start:end])
                out_changed = attention(q, k_changed, v_changed, lo, hi, backend=backend)
            assert torch.equal(out[outside], out_changed[outside]), (backend, layout, start, end)

        out = attention(q, k, v, lo, hi, backend="reference")
        loss = (out[outside] * torch.randn_like(out[outside])).sum()
        grad_k, grad_v = torch.autograd.grad(loss, (k, v))
        assert not grad_k[start:end].any() and not grad_v[start:end].any()
        checked += 1


# ----------------------------------------------------------------------------- flex


@pytest.mark.parametrize("group", [1, 2, 7])
def test_flex_forward_on_cpu_matches_reference(group: int) -> None:
    rng = random.Random(50 + group)
    flex, reference = FlexAttention(compiled=False), ReferenceAttention()
    for case in range(8):
        # Up to ~6 * 6 * 40 tokens: several 128-token tiles and a ragged last one.
        lo, hi, _ = _micro_batch(rng, max_run_length=40, max_samples=6)
        q, k, v = _qkv(lo.shape[0], 2 * group, 2, 16, torch.float32, seed=case)
        with torch.no_grad():
            out = flex.forward(q, k, v, flex.prepare(lo, hi), 0.25)
            expected = reference.forward(q, k, v, reference.prepare(lo, hi), 0.25)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


def test_flex_backward_on_cpu_raises_a_clear_error() -> None:
    lo, hi = lo_hi_for_layout([[("causal", 8)]])
    q, k, v = _qkv(8, 2, 1, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="no CPU backward.*'reference'"):
        attention(q, k, v, lo, hi, backend="flex")


@pytest.mark.parametrize("block_size", [4, 16, 128])
def test_tile_classification_is_conservative_and_exact_where_it_claims(block_size: int) -> None:
    rng = random.Random(block_size)
    for _ in range(40):
        lo, hi, allowed = _micro_batch(rng, max_run_length=40, max_samples=6)
        num_tokens = lo.shape[0]
        partial, full = classify_tiles(lo, hi, block_size)
        num_blocks = -(-num_tokens // block_size)
        assert partial.shape == full.shape == (num_blocks, num_blocks)
        assert not (partial & full).any()
        # Tiles of the oracle mask; cells past T count as allowed for "all", not for "any".
        pad = num_blocks * block_size - num_tokens
        tiles_any = torch.nn.functional.pad(allowed, (0, pad, 0, pad), value=False)
        tiles_all = torch.nn.functional.pad(allowed, (0, pad, 0, pad), value=True)
        tile_shape = (num_blocks, block_size, num_blocks, block_size)
        tile_has_any = tiles_any.view(tile_shape).any(dim=3).any(dim=1)  # [nQ, nK]
        tile_is_all = tiles_all.view(tile_shape).all(dim=3).all(dim=1)  # [nQ, nK]
        assert (tile_is_all | ~full).all()
        assert not (tile_has_any & ~partial & ~full).any()
        if pad:  # a tile cut by the end of the sequence is never full
            assert not full[-1].any() and not full[:, -1].any()

        block_mask = block_mask_from_lo_hi(lo, hi, block_size)
        dense = block_mask.to_dense()[0, 0, :num_blocks, :num_blocks].bool()
        assert torch.equal(dense, partial | full)
        # Never sparser than torch's exact construction, and full only where it is full.
        exact = create_block_mask(
            lo_hi_mask_mod(lo, hi), None, None, num_tokens, num_tokens, "cpu", block_size
        )
        exact_any = exact.to_dense()[0, 0, :num_blocks, :num_blocks].bool()
        assert not (exact_any & ~dense).any()


def test_block_mask_equals_torch_construction_where_classification_is_exact() -> None:
    # Two documents (causal text, a full split, a noise split), then padding; T = 300.
    layout = [
        [("causal", 100), ("full", 60), ("noise", 40)],
        [("causal", 50), ("noise", 30)],
    ]
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(280, 20)
    lo, hi = torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi])
    ours = block_mask_from_lo_hi(lo, hi, block_size=32)
    exact = create_block_mask(lo_hi_mask_mod(lo, hi), None, None, 300, 300, "cpu", 32)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(ours, name), getattr(exact, name)), name
    assert ours.seq_lengths == exact.seq_lengths == (300, 300)


# ----------------------------------------------------------------------------- selection


def test_auto_on_cpu_is_the_reference() -> None:
    assert isinstance(get_attention_backend("auto", torch.device("cpu")), ReferenceAttention)
    assert get_attention_backend("reference", "cpu").name == "reference"
    assert get_attention_backend("flex", "cpu").name == "flex"


def test_unknown_or_unavailable_backends_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        get_attention_backend("triton", "cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CUDA devices only"):
        get_attention_backend("cuda", "cpu")
    # A module that cannot be imported (None in sys.modules raises ImportError) is "not built".
    monkeypatch.setitem(sys.modules, "modus_mega.ops.cuda_attention", None)
    with pytest.raises(ValueError, match="not available.*Build the extension"):
        get_attention_backend("cuda", "cuda")
    assert isinstance(get_attention_backend("auto", "cuda"), FlexAttention)


def test_auto_prefers_the_cuda_extension_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeCudaAttention(ReferenceAttention):
        name = "cuda"

    fake = types.ModuleType("modus_mega.ops.cuda_attention")
    fake.HAVE_CUDA_ATTENTION = False
    fake.CudaAttention = FakeCudaAttention
    monkeypatch.setitem(sys.modules, "modus_mega.ops.cuda_attention", fake)
    with pytest.raises(ValueError, match="HAVE_CUDA_ATTENTION = False"):
        get_attention_backend("cuda", "cuda")
    assert isinstance(get_attention_backend("auto", "cuda"), FlexAttention)

    fake.HAVE_CUDA_ATTENTION = True
    supported = {"head_dim": 128, "dtype": torch.bfloat16}
    assert isinstance(get_attention_backend("auto", "cuda", **supported), FakeCudaAttention)
    assert isinstance(get_attention_backend("cuda", "cuda:0"), FakeCudaAttention)
    assert isinstance(get_attention_backend("auto", "cpu", **supported), ReferenceAttention)
    # The tiny configs' head dim 16: the kernels would raise at the first forward.
    tiny = {"head_dim": 16, "dtype": torch.bfloat16}
    assert isinstance(get_attention_backend("auto", "cuda", **tiny), FlexAttention)
    with pytest.raises(ValueError, match="head_dim .*got 16.*'auto' or 'flex'"):
        get_attention_backend("cuda", "cuda", **tiny)


@pytest.mark.parametrize(
    ("device_type", "head_dim", "dtype", "built", "expected"),
    [
        ("cuda", 128, torch.bfloat16, True, "cuda"),
        ("cuda", 64, torch.float16, True, "cuda"),
        ("cuda", 16, torch.bfloat16, True, "flex"),  # tiny configs
        ("cuda", 96, torch.float16, True, "flex"),
        ("cuda", 128, torch.float32, True, "flex"),  # fp32 runs
        ("cuda", None, torch.bfloat16, True, "flex"),  # unknown: never the extension
        ("cuda", 128, None, True, "flex"),
        ("cuda", 128, torch.bfloat16, False, "flex"),  # not built
        ("cpu", 128, torch.bfloat16, True, "reference"),
        ("cpu", 16, torch.float32, False, "reference"),
    ],
)
def test_auto_picks_by_device_head_dim_dtype_and_build(
    device_type: str, head_dim: int | None, dtype: torch.dtype | None, built: bool, expected: str
) -> None:
    assert choose_attention_backend("auto", device_type, head_dim, dtype, built) == expected


def test_explicit_cuda_refuses_what_the_kernels_cannot_run() -> None:
    assert choose_attention_backend("cuda", "cuda", 64, torch.bfloat16, True) == "cuda"
    with pytest.raises(ValueError, match="got torch.float32.*'auto' or 'flex'"):
        choose_attention_backend("cuda", "cuda", 128, torch.float32, True)
    with pytest.raises(ValueError, match="not available: not built here"):
        choose_attention_backend("cuda", "cuda", 128, torch.bfloat16, False, "not built here")
    assert choose_attention_backend("flex", "cpu", 16, torch.float32, True) == "flex"


def test_compiled_flex_is_built_once_per_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """One torch.compile wrapper per backend object, however many micro-batches it serves
    (a wrapper per call recompiles every step, then falls back to eager silently)."""
    from torch.nn.attention.flex_attention import flex_attention

    wrappers = []
    real_compile = torch.compile

    def counting_compile(fn, **kwargs):  # flex_attention's wrapper runs eagerly on CPU
        if fn is not flex_attention:  # torch compiles its own helpers too
            return real_compile(fn, **kwargs)
        wrappers.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", counting_compile)
    backend = FlexAttention(compiled=True)
    for case in range(3):
        lo, hi = lo_hi_for_layout([[("causal", 5 + case), ("noise", 4)]])
        q, k, v = _qkv(lo.shape[0], 2, 1, 16, torch.float32, seed=case)
        with torch.no_grad():
            backend.forward(q, k, v, backend.prepare(lo, hi), 0.25)
    assert wrappers == [{"dynamic": False}]


def test_attention_defaults_to_inverse_sqrt_head_dim_scale() -> None:
    lo, hi = lo_hi_for_layout([[("causal", 3), ("full", 4)]])
    q, k, v = _qkv(7, 4, 4, 64, torch.float32, seed=1)
    torch.testing.assert_close(attention(q, k, v, lo, hi), attention(q, k, v, lo, hi, scale=0.125))


def test_shape_errors_name_the_problem() -> None:
    lo, hi = lo_hi_for_layout([[("causal", 5)]])
    backend = ReferenceAttention()
    plan = backend.prepare(lo, hi)
    q, k, v = _qkv(5, 3, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        backend.forward(q, k, v, plan, 1.0)
    q, k, v = _qkv(6, 2, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="lo/hi describe 5"):
        backend.forward(q, k, v, plan, 1.0)


# ----------------------------------------------------------------------------- GPU


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@requires_cuda
def test_auto_on_cuda_is_flex_or_the_extension() -> None:
    assert get_attention_backend("auto", "cuda").name in ("flex", "cuda")


@requires_cuda
@pytest.mark.parametrize("num_tokens", [1037, 4133])
def test_flex_on_gpu_matches_reference_forward_and_backward(num_tokens: int) -> None:
    """bf16 flex vs the fp32 reference: error at most 2x that of bf16 dense PyTorch (+ slack)."""
    rng = random.Random(num_tokens)
    samples, num_real = [], 0
    for _ in range(100):  # fill a token budget that is not a multiple of the 128-token tile
        sample = sample_random_layout(rng, max_samples=1, max_runs=8, max_run_length=150)[0]
        length = sum(run_length for _, run_length in sample)
        if num_real + length < num_tokens:
            samples.append(sample)
            num_real += length
    lo, hi = lo_hi_for_layout(samples)
    pad_lo, pad_hi = padding_lo_hi(num_real, num_tokens - num_real)
    lo, hi = torch.cat([lo, pad_lo]).cuda(), torch.cat([hi, pad_hi]).cuda()

    q, k, v = _qkv(num_tokens, 28, 4, 128, torch.bfloat16, seed=0, device="cuda")
    scale = 1 / math.sqrt(128)
    flex = get_attention_backend("flex", "cuda")
    out = flex.forward(q, k, v, flex.prepare(lo, hi), scale)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = ReferenceAttention()
    expected = reference.forward(q32, k32, v32, reference.prepare(lo, hi), scale)

    # Same-precision baseline: dense masked attention with bf16 scores and probabilities.
    allowed = dense_mask_from_lo_hi(lo, hi)
    k_full, v_full = (t.repeat_interleave(7, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k_full) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    baseline = torch.einsum("hqk,khd->qhd", probs, v_full)

    cotangent = torch.randn_like(expected)
    grads = _grads(out, cotangent.bfloat16(), q, k, v)
    grads_baseline = _grads(baseline, cotangent.bfloat16(), q, k, v)
    grads_expected = _grads(expected, cotangent, q32, k32, v32)
    pairs = [(out, baseline, expected), *zip(grads, grads_baseline, grads_expected)]
    for name, (got, base, want) in zip(("out", "dq", "dk", "dv"), pairs):
        assert got.dtype == torch.bfloat16
        assert _relative_error(got, want) <= 2 * _relative_error(base, want) + 1e-3, name


# ----------------------------------------------------------------------------- queries over a cache


def _query_range(rng: random.Random, num_tokens: int) -> tuple[int, int]:
    """A query offset anywhere in the keys and Tq: mostly the last rows, sometimes fewer."""
    q_offset = rng.randrange(num_tokens)
    last = num_tokens - q_offset
    return q_offset, last if rng.random() < 0.7 else rng.randint(1, last)


@pytest.mark.parametrize(("group", "head_dim"), [(1, 16), (7, 16), (2, 64)])
def test_reference_over_a_cache_equals_the_rows_of_the_full_attention(
    group: int, head_dim: int
) -> None:
    """Forward and backward at fp64: the cached form is exactly rows [q_offset, q_offset + Tq)
    of the full-sequence attention (and of the dense oracle), for any offset."""
    rng = random.Random(300 + group)
    for case in range(25):
        lo, hi, allowed = _micro_batch(rng, max_run_length=20, max_samples=5)
        num_tokens = lo.shape[0]
        q_offset, num_queries = _query_range(rng, num_tokens)
        rows = slice(q_offset, q_offset + num_queries)
        q, k, v = _qkv(num_tokens, 2 * group, 2, head_dim, torch.float64, seed=case)
        backend = ReferenceAttention(max_group_tokens=rng.choice([1, 7, 1024]))

        full = backend.forward(q, k, v, backend.prepare(lo, hi), 0.3)
        q_rows = q.detach()[rows].requires_grad_()
        plan = backend.prepare(lo, hi, q_offset, num_queries)
        cached = backend.forward(q_rows, k, v, plan, 0.3)
        assert cached.shape == (num_queries, 2 * group, head_dim)
        torch.testing.assert_close(cached, full[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            cached, _dense_attention(q, k, v, allowed, 0.3)[rows], rtol=1e-10, atol=1e-10
        )

        cotangent = torch.randn_like(cached)
        dq, dk, dv = _grads(cached, cotangent, q_rows, k, v)
        full_cotangent = torch.zeros_like(full)
        full_cotangent[rows] = cotangent
        full_dq, full_dk, full_dv = _grads(full, full_cotangent, q, k, v)
        torch.testing.assert_close(dq, full_dq[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dk, full_dk, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dv, full_dv, rtol=1e-10, atol=1e-12)

        _, lse = reference_attention_with_lse(q_rows, k, v, lo, hi, 0.3, q_offset=q_offset)
        _, full_lse = reference_attention_with_lse(q, k, v, lo, hi, 0.3)
        torch.testing.assert_close(lse, full_lse[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_over_a_cache_equals_the_rows_of_the_full_attention(dtype: torch.dtype) -> None:
    """CPU forward (no CPU backward in torch). fp32 against the reference's rows; bf16 by the
    accuracy rule: error against the fp32 rows at most 2x that of dense bf16 PyTorch."""
    rng = random.Random(400)
    flex, reference = FlexAttention(compiled=False), ReferenceAttention()
    for case in range(6):
        # Up to ~6 * 6 * 40 tokens: several 128-token tiles and ragged last ones.
        lo, hi, allowed = _micro_batch(rng, max_run_length=40, max_samples=6)
        num_tokens = lo.shape[0]
        q_offset, num_queries = _query_range(rng, num_tokens)
        rows = slice(q_offset, q_offset + num_queries)
        q, k, v = _qkv(num_tokens, 4, 2, 16, dtype, seed=case)
        with torch.no_grad():
            out = flex.forward(q[rows], k, v, flex.prepare(lo, hi, q_offset, num_queries), 0.25)
            q32, k32, v32 = (t.float() for t in (q, k, v))
            expected = reference.forward(q32, k32, v32, reference.prepare(lo, hi), 0.25)[rows]
        assert out.shape == (num_queries, 4, 16) and out.dtype == dtype and out.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
        else:
            with torch.no_grad():
                group_keys, group_values = (t.repeat_interleave(2, dim=1) for t in (k, v))
                scores = torch.einsum("qhd,khd->hqk", q, group_keys) * 0.25
                probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
                baseline = torch.einsum("hqk,khd->qhd", probs, group_values)[rows]
            error = (out.double() - expected.double()).abs().max().item()
            baseline_error = (baseline.double() - expected.double()).abs().max().item()
            assert error <= 2 * baseline_error + 1e-4, (error, baseline_error)


def test_query_ranges_are_checked() -> None:
    lo, hi = lo_hi_for_layout([[("causal", 6)]])
    for backend in (ReferenceAttention(), FlexAttention(compiled=False)):
        with pytest.raises(ValueError, match=r"rows \[4, 8\) run past the 6 keys"):
            backend.prepare(lo, hi, 4, 4)
        with pytest.raises(ValueError, match="q_offset must be an integer >= 0"):
            backend.prepare(lo, hi, -1)
        prepared = backend.prepare(lo, hi, 2)  # the last 4 rows
        q, k, v = _qkv(6, 2, 1, 16, torch.float32, seed=0)
        with pytest.raises(ValueError, match="6 keys and 4 query rows"):
            with torch.no_grad():
                backend.forward(q, k, v, prepared, 1.0)


def test_cache_boundaries_are_where_the_prefix_ignores_the_rest() -> None:
    lo, _ = lo_hi_for_layout([[("causal", 3), ("full", 4), ("noise", 3)], [("causal", 2)]])
    expected = [1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1]  # positions 0 .. 12
    assert cache_boundaries(lo).tolist() == [bool(b) for b in expected]

    # The definition, through attention: the rows before a boundary computed from the prefix
    # alone equal the full-sequence rows; before any other split point they differ.
    rng = random.Random(8)
    backend = ReferenceAttention()
    for case in range(15):
        lo, hi, _ = _micro_batch(rng, max_run_length=10)
        num_tokens = lo.shape[0]
        q, k, v = _qkv(num_tokens, 2, 1, 16, torch.float64, seed=case)
        with torch.no_grad():
            full = backend.forward(q, k, v, backend.prepare(lo, hi), 1.0)
            for split, allowed_split in enumerate(cache_boundaries(lo).tolist()):
                if not 0 < split < num_tokens:
                    continue
                prefix = backend.prepare(lo[:split], hi[:split].clamp_max(split))
                alone = backend.forward(q[:split], k[:split], v[:split], prefix, 1.0)
                assert torch.allclose(alone, full[:split], rtol=0, atol=1e-12) == allowed_split
