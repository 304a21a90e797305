"""The CUDA attention kernels against the fp32 reference.

Three tiers: CPU tests of the Python side (custom ops, fake kernels, input checks); CPU runs
of the kernels' own source through ``csrc/modus_attn/cpu_emulation.h`` (built with the host
compiler; skipped without one or without the CUDA headers); GPU tests (skipped without CUDA
and the built extension) that sweep layouts, GQA groups, dtypes, head dims and tile edges.

Accuracy rule (flash-attention's): the kernels' max error against the fp32 oracle
(``attention_reference``, fed the same low-precision inputs) is at most twice the error of
the same computation done by plain PyTorch in the inputs' precision, plus a rounding floor,
for out, dq, dk, dv; the log-sum-exp is fp32 in the kernels and is held to a fixed bound.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from modus_mega.ops import cuda_attention
from modus_mega.ops.attention import attention, get_attention_backend
from modus_mega.ops.attention_reference import reference_attention_with_lse
from modus_mega.ops.block_metadata import (
    MAX_METADATA_TOKENS,
    BlockMetadata,
    build_block_metadata_reference,
    check_metadata_size,
)
from modus_mega.ops.cuda_attention import (
    HAVE_CUDA_ATTENTION,
    CudaAttention,
    build_block_metadata,
    cuda_attention_with_lse,
)
from modus_mega.ops.mask import (
    Layout,
    layout_num_tokens,
    lo_hi_for_layout,
    padding_lo_hi,
    sample_random_layout,
)

DEVICE = torch.device("cuda")
requires_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_CUDA_ATTENTION),
    reason="needs a CUDA device and the built modus_attn extension",
)

# ----------------------------------------------------------------------------- layouts


def _packed_docs(rng: random.Random, num_docs: int, max_len: int) -> Layout:
    return [[("causal", rng.randint(1, max_len))] for _ in range(num_docs)]


def _modus_sample(rng: random.Random, scale: int) -> list[tuple[str, int]]:
    """One training document shaped like DESIGN §3: conditions then a target."""
    runs: list[tuple[str, int]] = []
    for _ in range(rng.randint(1, 3)):  # conditions
        runs.append(("causal", 1))  # <start:{modality}>
        if rng.random() < 0.5:
            runs.append(("causal", rng.randint(1, 4 * scale)))  # 1D condition
        else:
            runs.append(("full", rng.randint(4, 8 * scale)))  # clean VAE split
            runs.append(("full", rng.randint(4, 6 * scale)))  # ViT split
    runs.append(("causal", 1))
    if rng.random() < 0.6:
        runs.append(("noise", rng.randint(4, 10 * scale)))  # 2D target
    else:
        runs.append(("causal", rng.randint(1, 4 * scale)))  # 1D target
    return runs


def _micro_batch(name: str) -> tuple[Tensor, Tensor]:
    """lo, hi (int32 [T], on DEVICE) of the named test micro-batch."""
    rng = random.Random(name)
    padding = 0
    if name == "text_only":
        layout: Layout = [[("causal", 1000)]]
    elif name == "packed_docs":
        layout = _packed_docs(rng, 12, 400)
        padding = 37
    elif name == "modus":
        layout = [_modus_sample(rng, scale=24) for _ in range(6)]
        padding = 70
    elif name == "tiny_docs":
        layout = _packed_docs(rng, 150, 5)
        padding = 3
    elif name == "long_doc":
        layout = [[("causal", 90), ("full", 700), ("causal", 33), ("noise", 1400)]]
    elif name == "random_splits":
        layout = sample_random_layout(rng, max_samples=8, max_runs=6, max_run_length=150)
        padding = 5
    elif name.startswith("tokens_"):  # boundaries that are not tile multiples
        layout = [[("causal", int(name.removeprefix("tokens_")))]]
    else:
        raise ValueError(f"unknown micro-batch {name!r}")
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(layout_num_tokens(layout), padding)
    return torch.cat([lo, pad_lo]).to(DEVICE), torch.cat([hi, pad_hi]).to(DEVICE)


LAYOUTS = ["text_only", "packed_docs", "modus", "tiny_docs", "long_doc", "random_splits"]
EDGE_TOKENS = [1, 63, 65, 127, 129, 191, 200]

# ----------------------------------------------------------------------------- oracles


def _torch_attention(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Dense masked attention computed in the inputs' dtype (the "same precision PyTorch"
    of the accuracy rule); returns out [T, Hq, D] and lse [T, Hq]."""
    num_tokens, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    keys = k.repeat_interleave(group, dim=1)  # [T, Hq, D]
    values = v.repeat_interleave(group, dim=1)
    rows = torch.arange(num_tokens, device=q.device)[:, None]
    allowed = (lo[None, :] <= rows) & (rows < hi[None, :])  # [T (q), T (k)]
    seen = allowed.any(dim=1)  # [T]
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale  # [Hq, T, T]
    # Rows that see nothing get zero scores (no NaN in the softmax) and zero probabilities.
    scores = scores.masked_fill(~allowed & seen[:, None], -math.inf).masked_fill(~seen[:, None], 0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~seen[:, None], 0)
    out = torch.einsum("hqk,khd->qhd", probs, values)
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(~seen[None], -math.inf)  # [Hq, T]
    return out, lse.t()


def _grads(
    out: Tensor, lse: Tensor | None, dout: Tensor, dlse: Tensor | None, inputs: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum()
    return torch.autograd.grad(loss, inputs)


def _inputs(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    device: torch.device | None = None,
) -> tuple[Tensor, ...]:
    """q, k, v and an output gradient, standard normal in ``dtype``, on ``device`` (DEVICE)."""
    device = DEVICE if device is None else device
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return (
        randn(num_tokens, num_q_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim),
        randn(num_tokens, num_q_heads, head_dim),  # dout
    )


def _max_error(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


# (q, k, v, metadata, scale, deterministic) -> (out [T, Hq, D], lse [T, Hq])
AttendFn = Callable[[Tensor, Tensor, Tensor, BlockMetadata, float, bool], tuple[Tensor, Tensor]]


def _check_against_oracles(
    attend: AttendFn,
    lo: Tensor,
    hi: Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    deterministic: bool = False,
    with_dlse: bool = False,
    seed: int = 0,
) -> None:
    """Outputs, lse and gradients of ``attend`` against the oracles (module docstring)."""
    num_tokens, device = lo.shape[0], lo.device
    q, k, v, dout = _inputs(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed, device)
    dlse = torch.randn(num_tokens, num_q_heads, device=device) if with_dlse else None
    scale = head_dim**-0.5
    metadata = build_block_metadata(lo, hi)

    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    out, lse = attend(*leaves, metadata, scale, deterministic)
    grads = _grads(out, lse, dout, dlse, leaves)

    ref_leaves = tuple(x.detach().float().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention_with_lse(*ref_leaves, lo, hi, scale)
    ref_grads = _grads(ref_out, ref_lse, dout, dlse, ref_leaves)

    pt_leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    pt_out, pt_lse = _torch_attention(*pt_leaves, lo, hi, scale)
    pt_grads = _grads(pt_out, pt_lse, dout, dlse, pt_leaves)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (num_tokens, num_q_heads)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have lse = -inf"
    assert bool((lse[~finite] == -math.inf).all())
    if bool(finite.any()):
        lse_error = _max_error(lse[finite], ref_lse[finite])
        assert lse_error <= 1e-3 * max(1.0, ref_lse[finite].abs().max().item()), lse_error
    for name, got, ref, pt in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (pt_out, *pt_grads)
    ):
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert bool(torch.isfinite(got).all()), f"{name} has non-finite values"
        error, pt_error = _max_error(got, ref), _max_error(pt, ref)
        # Rounding floor; the 0.1 covers gradients that vanish (a row with a single key has
        # dS = 0 exactly in PyTorch but only up to fp32 summation order in the kernels).
        floor = 1e-4 * max(ref.abs().max().item(), 0.1)
        assert error <= 2 * pt_error + floor, (
            f"{name}: kernel error {error:.3e} exceeds twice the {dtype} PyTorch error "
            f"{pt_error:.3e} (+ {floor:.1e})"
        )


# ----------------------------------------------------------------------------- CPU tests


def test_flag_matches_the_extension() -> None:
    assert HAVE_CUDA_ATTENTION == (cuda_attention._ext is not None)


def test_fake_implementations_trace_forward_and_backward() -> None:
    """The registered fake kernels give the real ops' shapes, dtypes and gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    lo, hi = lo_hi_for_layout([[("causal", 130), ("noise", 70)]])
    meta = build_block_metadata_reference(lo, hi)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(200, 8, 64, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(200, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        v = torch.empty(200, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        out, lse = torch.ops.modus_attn.attention_forward(
            q,
            k,
            v,
            meta.lo,
            meta.hi,
            meta.fwd_blocks,
            meta.fwd_counts,
            meta.fwd_order,
            meta.bwd_blocks,
            meta.bwd_counts,
            meta.bwd_order,
            0.125,
            False,
        )
        assert out.shape == (200, 8, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (8, 200) and lse.dtype == torch.float32
        dq, dk, dv = torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_refuses_what_the_kernels_cannot_run() -> None:
    lo, hi = lo_hi_for_layout([[("causal", 16)]])
    meta = build_block_metadata(lo, hi)  # CPU: the reference builder
    assert isinstance(meta, BlockMetadata)
    q = torch.zeros(16, 4, 64, dtype=torch.bfloat16)
    kv = torch.zeros(16, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_attention_with_lse(q, kv, kv, meta)
    with pytest.raises(ValueError, match="lo/hi describe"):
        cuda_attention_with_lse(q[:8], kv[:8], kv[:8], meta)


def test_misaligned_inputs_are_copied_for_the_kernels() -> None:
    """A contiguous view at an odd storage offset is misaligned; ``.contiguous()`` would
    return it unchanged and the binding would refuse it, so the layout helper copies."""
    storage = torch.randn(16 * 4 * 64 + 1).to(torch.bfloat16)
    misaligned = storage[1:].view(16, 4, 64)  # starts 2 bytes into the storage
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    copied = cuda_attention._kernel_layout(misaligned)
    assert copied.data_ptr() % 16 == 0 and copied.is_contiguous()
    assert torch.equal(copied, misaligned)
    # Views the kernels read in place (a fused projection's q) are not copied.
    fused = torch.zeros(16, 4 + 2, 64, dtype=torch.bfloat16)
    q = fused[:, :4]
    assert cuda_attention._kernel_layout(q) is q
    odd_stride = torch.zeros(16, 4, 68, dtype=torch.bfloat16)[..., :64]  # head stride 68
    assert cuda_attention._kernel_layout(odd_stride).stride() == (256, 64, 1)


def test_block_metadata_refuses_too_many_tokens() -> None:
    check_metadata_size(MAX_METADATA_TOKENS)  # the stated limit itself is fine
    lo = torch.arange(MAX_METADATA_TOKENS + 1, dtype=torch.int32)
    for build in (build_block_metadata, build_block_metadata_reference):
        with pytest.raises(ValueError, match=f"T = {MAX_METADATA_TOKENS + 1}.*limit is T = "
                           f"{MAX_METADATA_TOKENS}.*data.token_budget"):
            build(lo, lo + 1)


# ----------------------------------------------------------------------------- CPU emulation

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "modus_attn"
_DRIVER = """#include "cpu_emulation.h"
int main(int argc, char** argv) { return modus_attn::emulation::main(argc, argv); }
"""
_NUMPY_DTYPES = {torch.int16: np.int16, torch.int32: np.int32, torch.float32: np.float32}
_METADATA_FIELDS = (
    "fwd_bounds",
    "fwd_blocks",
    "fwd_counts",
    "fwd_order",
    "bwd_bounds",
    "bwd_blocks",
    "bwd_counts",
    "bwd_order",
)


def _cuda_include_dir() -> Path | None:
    """The CUDA toolkit headers (the emulation needs cuda_bf16.h and the runtime's types)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_bf16.h").exists():
            return Path(root) / "include"
    return None


class _EmulatedExtension:
    """The extension's interface (``build_block_metadata``, ``attention_forward``,
    ``attention_backward``) run by the emulator binary on CPU tensors, through files."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.calls = 0

    def _run(
        self,
        mode: str,
        config: str,
        inputs: dict[str, Tensor],
        outputs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    ) -> list[Tensor]:
        self.calls += 1
        directory = self.workdir / f"call{self.calls}"
        directory.mkdir()
        (directory / "config.txt").write_text(f"{mode} {config}\n")
        for name, tensor in inputs.items():
            tensor = tensor.detach().contiguous()
            raw = (
                tensor.view(torch.int16)
                if tensor.dtype in (torch.bfloat16, torch.float16)
                else tensor
            )
            raw.numpy().tofile(directory / f"{name}.bin")
        result = subprocess.run([str(self.binary), str(directory)], capture_output=True, text=True)
        assert result.returncode == 0, f"emulated {mode} failed:\n{result.stderr[-4000:]}"
        tensors = []
        for name, (dtype, shape) in outputs.items():
            storage = torch.int16 if dtype in (torch.bfloat16, torch.float16) else dtype
            data = np.fromfile(directory / f"{name}.bin", dtype=_NUMPY_DTYPES[storage])
            tensors.append(torch.from_numpy(data).view(dtype).reshape(shape))
        return tensors

    @staticmethod
    def _config(
        q: Tensor,
        k: Tensor,
        scale: float,
        deterministic: bool,
        has_dlse: bool,
        q_offset: int = 0,
    ) -> str:
        num_queries, num_q_heads, head_dim = q.shape
        dtype = "bf16" if q.dtype == torch.bfloat16 else "fp16"
        shape = f"{k.shape[0]} {num_q_heads} {k.shape[1]} {head_dim}"
        flags = f"{int(deterministic)} {int(has_dlse)} {num_queries} {q_offset}"
        return f"{shape} {dtype} {scale!r} {flags}"

    def build_block_metadata(
        self, lo: Tensor, hi: Tensor, q_offset: int, num_queries: int
    ) -> list[Tensor]:
        num_tokens = lo.shape[0]
        num_128, num_64 = -(-num_tokens // 128), -(-num_tokens // 64)
        q_128, q_64 = -(-num_queries // 128), -(-num_queries // 64)
        shapes = {
            "fwd_bounds": (num_64, 4),
            "fwd_blocks": (q_128, num_64),
            "fwd_counts": (q_128,),
            "fwd_order": (q_128,),
        }
        shapes |= {
            "bwd_bounds": (num_128, 4),
            "bwd_blocks": (num_128, q_64),
            "bwd_counts": (num_128,),
            "bwd_order": (num_128,),
        }
        return self._run(
            "metadata",
            f"{num_tokens} 1 1 64 bf16 1.0 0 0 {num_queries} {q_offset}",
            {"lo": lo, "hi": hi},
            {name: (torch.int32, shapes[name]) for name in _METADATA_FIELDS},
        )

    def attention_forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lo: Tensor,
        hi: Tensor,
        fwd_blocks: Tensor,
        fwd_counts: Tensor,
        fwd_order: Tensor,
        scale: float,
        q_offset: int,
    ) -> list[Tensor]:
        num_queries, num_q_heads, _ = q.shape
        inputs = {
            "q": q,
            "k": k,
            "v": v,
            "lo": lo,
            "hi": hi,
            "fwd_blocks": fwd_blocks,
            "fwd_counts": fwd_counts,
            "fwd_order": fwd_order,
        }
        outputs = {
            "out": (q.dtype, tuple(q.shape)),
            "lse": (torch.float32, (num_q_heads, num_queries)),
        }
        config = self._config(q, k, scale, False, False, q_offset)
        return self._run("forward", config, inputs, outputs)

    def attention_backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        dlse: Tensor | None,
        lo: Tensor,
        hi: Tensor,
        fwd_blocks: Tensor,
        fwd_counts: Tensor,
        fwd_order: Tensor,
        bwd_blocks: Tensor,
        bwd_counts: Tensor,
        bwd_order: Tensor,
        scale: float,
        deterministic: bool,
    ) -> list[Tensor]:
        inputs = {
            "dout": dout,
            "q": q,
            "k": k,
            "v": v,
            "out": out,
            "lse": lse,
            "lo": lo,
            "hi": hi,
            "fwd_blocks": fwd_blocks,
            "fwd_counts": fwd_counts,
            "fwd_order": fwd_order,
            "bwd_blocks": bwd_blocks,
            "bwd_counts": bwd_counts,
            "bwd_order": bwd_order,
        }
        if dlse is not None:
            inputs["dlse"] = dlse
        outputs = {
            "dq": (q.dtype, tuple(q.shape)),
            "dk": (k.dtype, tuple(k.shape)),
            "dv": (v.dtype, tuple(v.shape)),
        }
        return self._run(
            "backward", self._config(q, k, scale, deterministic, dlse is not None), inputs, outputs
        )


@pytest.fixture(scope="module")
def emulator_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernels' CPU emulation, compiled by the host compiler."""
    compiler = shutil.which("g++")
    cuda_include = _cuda_include_dir()
    if compiler is None or cuda_include is None:
        pytest.skip("the CPU emulation needs g++ and the CUDA headers")
    build = tmp_path_factory.mktemp("emulator")
    (build / "driver.cpp").write_text(_DRIVER)
    command = [
        compiler,
        "-std=c++20",
        "-O1",
        "-U_FORTIFY_SOURCE",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-attributes",
        "-Wno-unknown-pragmas",
        "-I",
        str(SOURCE_DIR),
        "-isystem",
        str(cuda_include),
        str(build / "driver.cpp"),
        "-o",
        str(build / "emulator"),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"the emulation does not build:\n{result.stderr[-4000:]}"
    return build / "emulator"


@pytest.fixture
def emulated_extension(
    emulator_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> _EmulatedExtension:
    """The emulator installed as the extension of ``ops.cuda_attention`` for one test."""
    extension = _EmulatedExtension(emulator_binary, tmp_path)
    monkeypatch.setattr(cuda_attention, "_ext", extension)
    return extension


def _attend_through_ops(
    q: Tensor, k: Tensor, v: Tensor, metadata: BlockMetadata, scale: float, deterministic: bool
) -> tuple[Tensor, Tensor]:
    """The custom op (and its autograd formula) on CPU tensors; the device check of
    ``cuda_attention_with_lse`` is the only step left out."""
    out, lse = torch.ops.modus_attn.attention_forward(
        q,
        k,
        v,
        metadata.lo,
        metadata.hi,
        metadata.fwd_blocks,
        metadata.fwd_counts,
        metadata.fwd_order,
        metadata.bwd_blocks,
        metadata.bwd_counts,
        metadata.bwd_order,
        scale,
        deterministic,
        metadata.q_offset,
    )
    return out, lse.t()


def test_emulated_metadata_equals_the_reference(emulated_extension: _EmulatedExtension) -> None:
    """The metadata kernels, several ballot rounds deep, on packed layouts and on arbitrary
    intervals (negative, past T, empty)."""
    gen = torch.Generator().manual_seed(9)
    arbitrary_lo = torch.randint(-10, 2500, (2500,), generator=gen, dtype=torch.int32)
    arbitrary_hi = arbitrary_lo + torch.randint(-20, 900, (2500,), generator=gen, dtype=torch.int32)
    cases = [
        lo_hi_for_layout([[("causal", 3000)]]),
        lo_hi_for_layout([_modus_sample(random.Random(4), 30) for _ in range(8)]),
    ]
    for lo, hi in [*cases, (arbitrary_lo, arbitrary_hi)]:
        num_tokens = lo.shape[0]
        # All rows; then queries over a cache: the last rows, one decode row, a middle range.
        for q_offset, num_queries in (
            (0, num_tokens),
            (1000, num_tokens - 1000),
            (num_tokens - 1, 1),
            (700, 300),
        ):
            got = emulated_extension.build_block_metadata(lo, hi, q_offset, num_queries)
            ref = build_block_metadata_reference(lo, hi, q_offset, num_queries)
            for name, tensor in zip(_METADATA_FIELDS, got):
                assert torch.equal(tensor, getattr(ref, name)), (name, q_offset, num_queries)


def _small_modus_batch() -> tuple[Tensor, Tensor]:
    layout: Layout = [
        [("causal", 3), ("full", 40), ("causal", 1), ("noise", 60)],
        [("causal", 20), ("full", 30), ("causal", 1), ("noise", 25)],
    ]
    lo, hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(layout_num_tokens(layout), 13)
    return torch.cat([lo, pad_lo]), torch.cat([hi, pad_hi])


def _intervals_with_empty_rows() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    lo = torch.randint(0, 150, (150,), generator=gen, dtype=torch.int32)
    # Many keys get lo == hi (they see nothing), so some rows see no key.
    width = torch.randint(-10, 12, (150,), generator=gen, dtype=torch.int32).clamp_min(0)
    hi = (lo + width).clamp_max(150)
    return lo, hi


@pytest.mark.parametrize(
    ("batch", "num_q_heads", "num_kv_heads", "head_dim", "dtype", "deterministic", "with_dlse"),
    [
        (_small_modus_batch, 7, 1, 64, torch.bfloat16, False, False),
        (_intervals_with_empty_rows, 2, 1, 128, torch.float16, True, True),
    ],
)
def test_emulated_kernels_match_the_oracles(
    emulated_extension: _EmulatedExtension,
    batch: Callable[[], tuple[Tensor, Tensor]],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    deterministic: bool,
    with_dlse: bool,
) -> None:
    """The kernels' source, run on CPU: forward, backward (both dQ paths), GQA, rows
    without keys, the lse gradient, tiles cut by T."""
    lo, hi = batch()
    if batch is _intervals_with_empty_rows:
        rows = torch.arange(lo.shape[0])[:, None]
        assert not bool(((lo[None, :] <= rows) & (rows < hi[None, :])).any(dim=1).all()), (
            "want empty rows"
        )
    _check_against_oracles(
        _attend_through_ops,
        lo,
        hi,
        num_q_heads,
        num_kv_heads,
        head_dim,
        dtype,
        deterministic=deterministic,
        with_dlse=with_dlse,
    )
    assert emulated_extension.calls == 2  # one forward, one backward


def _cached_layouts() -> list[tuple[Tensor, Tensor]]:
    """lo, hi of small packed micro-batches: causal text, full and noise splits, several
    samples, padding."""
    lo, hi = _small_modus_batch()
    rng = random.Random(21)
    layout = sample_random_layout(rng, max_samples=5, max_runs=5, max_run_length=30)
    r_lo, r_hi = lo_hi_for_layout(layout)
    pad_lo, pad_hi = padding_lo_hi(layout_num_tokens(layout), 7)
    return [(lo, hi), (torch.cat([r_lo, pad_lo]), torch.cat([r_hi, pad_hi]))]


def _check_rows_over_a_cache(
    attend: AttendFn,
    lo: Tensor,
    hi: Tensor,
    q_offset: int,
    num_queries: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> None:
    """Queries = rows [q_offset, q_offset + Tq) against the same rows of the full-sequence
    fp32 oracle, by the accuracy rule (forward: out and lse)."""
    num_tokens, device = lo.shape[0], lo.device
    q, k, v, _ = _inputs(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed, device)
    rows = slice(q_offset, q_offset + num_queries)
    scale = head_dim**-0.5
    metadata = build_block_metadata(lo, hi, q_offset, num_queries)
    with torch.no_grad():
        out, lse = attend(q[rows], k, v, metadata, scale, False)
        ref_out, ref_lse = reference_attention_with_lse(
            q.float(), k.float(), v.float(), lo, hi, scale
        )
        pt_out, _ = _torch_attention(q, k, v, lo, hi, scale)
    ref_out, ref_lse, pt_out = ref_out[rows], ref_lse[rows], pt_out[rows]
    assert out.shape == (num_queries, num_q_heads, head_dim) and out.dtype == dtype
    assert lse.shape == (num_queries, num_q_heads)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert _max_error(lse[finite], ref_lse[finite]) <= 1e-3 * max(1.0, ref_lse.abs().max().item())
    error, pt_error = _max_error(out, ref_out), _max_error(pt_out, ref_out)
    floor = 1e-4 * max(ref_out.abs().max().item(), 0.1)
    assert error <= 2 * pt_error + floor, (q_offset, num_queries, error, pt_error)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "num_q_heads", "num_kv_heads"),
    [(torch.bfloat16, 64, 4, 1), (torch.float16, 128, 2, 2)],
)
def test_emulated_forward_over_a_cache_equals_the_rows_of_the_full_forward(
    emulated_extension: _EmulatedExtension,
    dtype: torch.dtype,
    head_dim: int,
    num_q_heads: int,
    num_kv_heads: int,
) -> None:
    """The forward kernel's source on CPU with a query offset: tile classification and the
    mask use absolute rows. Offsets at a tile edge and not, last rows and a middle range."""
    for case, (lo, hi) in enumerate(_cached_layouts()):
        num_tokens = lo.shape[0]
        for q_offset, num_queries in (
            (num_tokens - 1, 1),  # one decode step
            (67, num_tokens - 67),  # the last rows, from inside a key block
            (num_tokens // 2, num_tokens // 4),  # rows that stop before the end of the keys
        ):
            _check_rows_over_a_cache(
                _attend_through_ops,
                lo,
                hi,
                q_offset,
                num_queries,
                num_q_heads,
                num_kv_heads,
                head_dim,
                dtype,
                seed=case,
            )


def test_kernels_refuse_the_backward_over_a_cache(emulated_extension: _EmulatedExtension) -> None:
    lo, hi = _small_modus_batch()
    metadata = build_block_metadata(lo, hi, 100)
    q, k, v, _ = _inputs(lo.shape[0], 2, 1, 64, torch.bfloat16, seed=0, device=torch.device("cpu"))
    q_rows = q[100:].detach().requires_grad_()
    with pytest.raises(ValueError, match="forward only.*torch.no_grad"):
        cuda_attention_with_lse(q_rows, k, v, metadata)
    out, _ = _attend_through_ops(q_rows, k, v, metadata, 0.125, False)
    with pytest.raises(RuntimeError, match="all the keys' rows; got 93 query rows at offset 100"):
        out.float().sum().backward()


# ----------------------------------------------------------------------------- GPU tests


@requires_kernels
@pytest.mark.parametrize("name", [*LAYOUTS, "tokens_8200"])
def test_gpu_metadata_equals_the_reference(name: str) -> None:
    lo, hi = _micro_batch(name)
    got = build_block_metadata(lo, hi)
    ref = build_block_metadata_reference(lo, hi)
    for field in (
        "fwd_bounds",
        "fwd_blocks",
        "fwd_counts",
        "fwd_order",
        "bwd_bounds",
        "bwd_blocks",
        "bwd_counts",
        "bwd_order",
    ):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field


@requires_kernels
@pytest.mark.parametrize("name", ["modus", "long_doc"])
def test_gpu_metadata_over_a_cache_equals_the_reference(name: str) -> None:
    lo, hi = _micro_batch(name)
    num_tokens = lo.shape[0]
    for q_offset, num_queries in ((num_tokens - 1, 1), (130, num_tokens - 130), (64, 200)):
        got = build_block_metadata(lo, hi, q_offset, num_queries)
        ref = build_block_metadata_reference(lo, hi, q_offset, num_queries)
        for field in _METADATA_FIELDS:
            assert torch.equal(getattr(got, field), getattr(ref, field)), (field, q_offset)


@requires_kernels
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", ["modus", "packed_docs", "long_doc"])
def test_gpu_forward_over_a_cache(name: str, head_dim: int) -> None:
    lo, hi = _micro_batch(name)
    num_tokens = lo.shape[0]
    for q_offset, num_queries in ((num_tokens - 1, 1), (191, num_tokens - 191), (64, 300)):
        _check_rows_over_a_cache(
            cuda_attention_with_lse, lo, hi, q_offset, num_queries, 7, 1, head_dim, torch.bfloat16
        )


@requires_kernels
def test_gpu_metadata_of_arbitrary_intervals() -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    num_tokens = 3001
    lo = torch.randint(
        -10, num_tokens, (num_tokens,), generator=gen, device=DEVICE, dtype=torch.int32
    )
    hi = lo + torch.randint(
        -20, 900, (num_tokens,), generator=gen, device=DEVICE, dtype=torch.int32
    )
    got, ref = build_block_metadata(lo, hi), build_block_metadata_reference(lo, hi)
    for field in (
        "fwd_bounds",
        "fwd_blocks",
        "fwd_counts",
        "fwd_order",
        "bwd_bounds",
        "bwd_blocks",
        "bwd_counts",
        "bwd_order",
    ):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field


@requires_kernels
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("name", LAYOUTS)
def test_gpu_layouts_and_gqa_groups(name: str, group: int) -> None:
    lo, hi = _micro_batch(name)
    _check_against_oracles(cuda_attention_with_lse, lo, hi, group * 2, 2, 128, torch.bfloat16)


@requires_kernels
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dtypes_head_dims_and_modes(
    dtype: torch.dtype, head_dim: int, deterministic: bool
) -> None:
    lo, hi = _micro_batch("modus")
    _check_against_oracles(
        cuda_attention_with_lse, lo, hi, 7, 1, head_dim, dtype, deterministic=deterministic
    )


@requires_kernels
@pytest.mark.parametrize("num_tokens", EDGE_TOKENS)
def test_gpu_tile_boundaries(num_tokens: int) -> None:
    lo, hi = _micro_batch(f"tokens_{num_tokens}")
    _check_against_oracles(cuda_attention_with_lse, lo, hi, 4, 1, 64, torch.bfloat16)
    _check_against_oracles(
        cuda_attention_with_lse, lo, hi, 4, 1, 128, torch.bfloat16, deterministic=True
    )


@requires_kernels
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_log_sum_exp_gradient(deterministic: bool) -> None:
    """A loss on the returned lse reaches q and k (through delta = rowsum(dO O) - dlse)."""
    lo, hi = _micro_batch("packed_docs")
    _check_against_oracles(
        cuda_attention_with_lse,
        lo,
        hi,
        4,
        2,
        128,
        torch.bfloat16,
        deterministic=deterministic,
        with_dlse=True,
    )


@requires_kernels
def test_gpu_rows_without_keys() -> None:
    """Arbitrary intervals leave rows that no key sees: out 0, lse -inf, finite gradients."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    num_tokens = 700
    lo = torch.randint(
        0, num_tokens, (num_tokens,), generator=gen, device=DEVICE, dtype=torch.int32
    )
    width = torch.randint(
        -30, 12, (num_tokens,), generator=gen, device=DEVICE, dtype=torch.int32
    ).clamp_min(0)
    hi = (lo + width).clamp_max(num_tokens)  # many keys with lo == hi: they see nothing
    rows = torch.arange(num_tokens, device=DEVICE)[:, None]
    assert not bool(((lo[None, :] <= rows) & (rows < hi[None, :])).any(dim=1).all()), (
        "want empty rows"
    )
    for deterministic in (False, True):
        _check_against_oracles(
            cuda_attention_with_lse,
            lo,
            hi,
            4,
            1,
            128,
            torch.bfloat16,
            deterministic=deterministic,
            with_dlse=True,
        )


def _noise_split_layout() -> tuple[Tensor, Tensor, slice]:
    """A micro-batch with one noise split; returns lo, hi and the split's token range."""
    layout: Layout = [
        [("causal", 50), ("full", 300), ("causal", 1), ("noise", 333), ("causal", 20)],
        [("causal", 77), ("noise", 64)],
    ]
    lo, hi = lo_hi_for_layout(layout)
    return lo.to(DEVICE), hi.to(DEVICE), slice(351, 684)


@requires_kernels
def test_gpu_noise_split_does_not_leak() -> None:
    """Changing a noise split's K/V changes no output, and no dQ, outside the split; a loss
    on the rows outside it gives that split's keys exactly zero dK, dV."""
    lo, hi, split = _noise_split_layout()
    num_tokens = lo.shape[0]
    outside = torch.ones(num_tokens, dtype=torch.bool, device=DEVICE)
    outside[split] = False
    q, k, v, dout = _inputs(num_tokens, 8, 2, 128, torch.bfloat16, seed=3)
    k2, v2 = k.clone(), v.clone()
    k2[split] = torch.randn_like(k2[split], dtype=torch.float32).to(torch.bfloat16) * 4
    v2[split] = torch.randn_like(v2[split], dtype=torch.float32).to(torch.bfloat16) * 4
    metadata = build_block_metadata(lo, hi)
    dout = dout * outside[:, None, None]
    results = []
    for keys, values in ((k, v), (k2, v2)):
        leaves = tuple(x.detach().requires_grad_() for x in (q, keys, values))
        out, _ = cuda_attention_with_lse(*leaves, metadata, deterministic=True)
        dq, dk, dv = torch.autograd.grad((out.float() * dout.float()).sum(), leaves)
        assert bool((dk[split] == 0).all()) and bool((dv[split] == 0).all())
        results.append((out[outside], dq[outside]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@requires_kernels
def test_gpu_deterministic_backward_is_bitwise_reproducible() -> None:
    lo, hi = _micro_batch("modus")
    q, k, v, dout = _inputs(lo.shape[0], 28, 4, 128, torch.bfloat16, seed=4)
    metadata = build_block_metadata(lo, hi)
    grads = []
    for _ in range(3):
        leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
        out, _ = cuda_attention_with_lse(*leaves, metadata, deterministic=True)
        grads.append(torch.autograd.grad(out, leaves, dout))
    for again in grads[1:]:
        for first, other in zip(grads[0], again):
            assert torch.equal(first, other)
    # The default (atomic dQ) mode computes the same gradients up to summation order.
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    out, _ = cuda_attention_with_lse(*leaves, metadata, deterministic=False)
    for fast, exact in zip(torch.autograd.grad(out, leaves, dout), grads[0]):
        torch.testing.assert_close(fast, exact, atol=2e-2, rtol=2e-2)


@requires_kernels
def test_gpu_strided_inputs_are_read_in_place() -> None:
    """q, k, v as views of one fused projection give the same result as contiguous copies."""
    lo, hi = _micro_batch("packed_docs")
    num_tokens = lo.shape[0]
    fused = torch.randn(num_tokens, 8 + 2 + 2, 128, device=DEVICE).to(torch.bfloat16)
    q, k, v = fused.split([8, 2, 2], dim=1)
    metadata = build_block_metadata(lo, hi)
    strided, _ = cuda_attention_with_lse(q, k, v, metadata)
    dense, _ = cuda_attention_with_lse(q.contiguous(), k.contiguous(), v.contiguous(), metadata)
    assert torch.equal(strided, dense)


@requires_kernels
def test_gpu_backend_seam_and_compile() -> None:
    """``get_attention_backend`` picks the kernels on CUDA; the op traces under
    torch.compile (fullgraph) and passes torch.library's op checks."""
    backend = get_attention_backend("auto", DEVICE, head_dim=64, dtype=torch.bfloat16)
    assert isinstance(backend, CudaAttention)
    lo, hi = _micro_batch("modus")
    q, k, v, _ = _inputs(lo.shape[0], 8, 2, 64, torch.bfloat16, seed=6)
    prepared = backend.prepare(lo, hi)
    eager = backend.forward(q, k, v, prepared, 0.125)
    compiled = torch.compile(backend.forward, fullgraph=True)(q, k, v, prepared, 0.125)
    assert torch.equal(eager, compiled)
    assert torch.equal(eager, attention(q, k, v, lo, hi, scale=0.125, backend="cuda"))
    args = (
        q,
        k,
        v,
        lo,
        hi,
        prepared.fwd_blocks,
        prepared.fwd_counts,
        prepared.fwd_order,
        prepared.bwd_blocks,
        prepared.bwd_counts,
        prepared.bwd_order,
        0.125,
        True,
    )
    torch.library.opcheck(
        torch.ops.modus_attn.attention_forward.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
