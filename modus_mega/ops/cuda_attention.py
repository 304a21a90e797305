"""The CUDA extension backend (csrc/modus_attn): fused masked GQA attention, forward and
backward, for bf16 / fp16 and head dims 64 and 128.

Legend: T = tokens (keys) of the packed micro-batch, Tq = query rows (T unless the queries
are rows of a cache, DESIGN §8), Hq / Hkv = query / key-value heads, D = head dim.

``HAVE_CUDA_ATTENTION`` is True when the compiled extension ``modus_mega._modus_attn``
imports (setup.py builds it where CUDA is present). The kernels are exposed as two
``torch.library`` custom ops with fake (meta) implementations and an autograd formula, so
they trace under ``torch.compile`` and run under autograd:

    modus_attn::attention_forward   (q, k, v, metadata..., q_offset) -> (out [Tq, Hq, D],
                                                                        lse [Hq, Tq])
    modus_attn::attention_backward  (dout, q, k, v, out, lse, dlse, ...) -> (dq, dk, dv)

Queries over a cache run forward only: the backward kernels need the queries to be all the
keys' rows, and refuse otherwise (generation never differentiates).

``CudaAttention.prepare`` builds the block metadata on the GPU once per micro-batch
(``ops.block_metadata`` is its specification); every layer's ``forward`` reuses it. The
backward is deterministic with ``CudaAttention(deterministic=True)`` (dQ by a separate
kernel instead of fp32 atomics; about 40 % more backward FLOPs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modus_mega.ops.attention import (
    CUDA_KERNEL_DTYPES,
    CUDA_KERNEL_HEAD_DIMS,
    AttentionBackend,
    check_qkv,
)
from modus_mega.ops.block_metadata import (
    BlockMetadata,
    build_block_metadata_reference,
    check_metadata_size,
)
from modus_mega.ops.mask import check_lo_hi, check_query_rows

try:
    from modus_mega import _modus_attn as _ext  # the compiled extension (setup.py)
except ImportError:
    _ext = None

HAVE_CUDA_ATTENTION = _ext is not None


def _require_extension() -> None:
    if _ext is None:
        raise RuntimeError(
            "the CUDA attention extension modus_mega._modus_attn is not built; build it on a "
            "CUDA machine (pip install --no-build-isolation -e .[gpu]) or use the 'reference' "
            "or 'flex' attention backend"
        )


def _kernel_layout(x: Tensor) -> Tensor:
    """``x`` if the kernels can read it in place (unit last stride, token and head strides
    multiples of 8 elements, 16-byte aligned start), else a fresh contiguous copy.

    A copy, not ``.contiguous()``: that returns a contiguous but misaligned view (e.g. at an
    odd storage offset) unchanged, which the binding then refuses. Fresh allocations are
    aligned (CUDA's caching allocator: 512 bytes; CPU: 64).
    """
    aligned = (
        x.stride(-1) == 1
        and x.stride(0) % 8 == 0
        and x.stride(1) % 8 == 0
        and x.data_ptr() % 16 == 0
    )
    return x if aligned else x.clone(memory_format=torch.contiguous_format)


def build_block_metadata(
    lo: Tensor, hi: Tensor, q_offset: int = 0, num_queries: int | None = None
) -> BlockMetadata:
    """The kernels' block metadata of one micro-batch (``ops.block_metadata``), for the
    query rows ``[q_offset, q_offset + Tq)`` of the keys (default: all rows).

    On a CUDA device with the extension built, the GPU kernels build it without a host
    sync; elsewhere the PyTorch specification does (identical tensors).
    """
    num_tokens = check_lo_hi(lo, hi)
    num_queries = check_query_rows(num_tokens, q_offset, num_queries)
    check_metadata_size(num_tokens, num_queries)
    if _ext is None or not lo.is_cuda:
        return build_block_metadata_reference(lo, hi, q_offset, num_queries)
    lo, hi = lo.contiguous(), hi.contiguous()
    (
        fwd_bounds,
        fwd_blocks,
        fwd_counts,
        fwd_order,
        bwd_bounds,
        bwd_blocks,
        bwd_counts,
        bwd_order,
    ) = _ext.build_block_metadata(lo, hi, q_offset, num_queries)
    return BlockMetadata(
        lo=lo,
        hi=hi,
        q_offset=q_offset,
        num_queries=num_queries,
        fwd_bounds=fwd_bounds,
        fwd_blocks=fwd_blocks,
        fwd_counts=fwd_counts,
        fwd_order=fwd_order,
        bwd_bounds=bwd_bounds,
        bwd_blocks=bwd_blocks,
        bwd_counts=bwd_counts,
        bwd_order=bwd_order,
    )


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("modus_attn::attention_forward", mutates_args=())
def _attention_forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """out [Tq, Hq, D] (contiguous, q's dtype) and lse [Hq, Tq] (float32, -inf on rows that
    see no key); query row r sits at absolute position ``q_offset + r`` of the T keys. The
    bwd_* lists and ``deterministic`` are inputs only so that autograd saves them for the
    backward."""
    _require_extension()
    out, lse = _ext.attention_forward(
        _kernel_layout(q),
        _kernel_layout(k),
        _kernel_layout(v),
        lo,
        hi,
        fwd_blocks,
        fwd_counts,
        fwd_order,
        scale,
        q_offset,
    )
    return out, lse


@_attention_forward_op.register_fake
def _attention_forward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    num_queries, num_q_heads, head_dim = q.shape
    out = q.new_empty((num_queries, num_q_heads, head_dim))
    lse = q.new_empty((num_q_heads, num_queries), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("modus_attn::attention_backward", mutates_args=())
def _attention_backward_op(
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
) -> tuple[Tensor, Tensor, Tensor]:
    """dq [T, Hq, D], dk, dv [T, Hkv, D] (contiguous, q's dtype). ``dlse`` [Hq, T] is the
    gradient reaching the log-sum-exp output, or None."""
    _require_extension()
    dq, dk, dv = _ext.attention_backward(
        _kernel_layout(dout),
        _kernel_layout(q),
        _kernel_layout(k),
        _kernel_layout(v),
        _kernel_layout(out),
        lse,
        None if dlse is None else dlse.float().contiguous(),
        lo,
        hi,
        fwd_blocks,
        fwd_counts,
        fwd_order,
        bwd_blocks,
        bwd_counts,
        bwd_order,
        scale,
        deterministic,
    )
    return dq, dk, dv


@_attention_backward_op.register_fake
def _attention_backward_fake(
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
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    *tensors, scale, deterministic, q_offset = inputs  # q, k, v, lo, hi, the six list tensors
    ctx.save_for_backward(*tensors, *output)
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.q_offset = q_offset


def _backward(
    ctx: torch.autograd.function.FunctionCtx, dout: Tensor | None, dlse: Tensor | None
) -> tuple[Tensor | None, ...]:
    q, k, v, lo, hi, *block_lists, out, lse = ctx.saved_tensors
    if ctx.q_offset != 0 or q.shape[0] != k.shape[0]:
        raise RuntimeError(
            f"the CUDA attention backward needs the queries to be all the keys' rows; got "
            f"{q.shape[0]} query rows at offset {ctx.q_offset} over {k.shape[0]} keys. Run "
            f"queries over a cache without autograd (generation), or differentiate the "
            f"full-sequence forward"
        )
    if dout is None:  # only the log-sum-exp reached the loss
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_backward_op(
        dout, q, k, v, out, lse, dlse, lo, hi, *block_lists, ctx.scale, ctx.deterministic
    )
    # lo, hi, the lists, scale, the mode and the offset get none
    return (dq, dk, dv) + (None,) * 11


_attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _check_kernel_inputs(q: Tensor, k: Tensor, v: Tensor, metadata: BlockMetadata) -> None:
    """Refuse inputs the kernels do not support, naming the fix."""
    check_qkv(q, k, v, metadata.num_tokens, metadata.num_queries)
    if metadata.over_cache and torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v)
    ):
        raise ValueError(
            "the CUDA attention kernels run queries over a cache forward only (no backward); "
            "call them under torch.no_grad() (generation), or differentiate the full-sequence "
            "forward"
        )
    if q.device.type != "cuda":
        raise ValueError(
            f"the CUDA attention backend needs CUDA tensors, got device {q.device}; use the "
            f"'reference' backend on CPU"
        )
    if q.dtype not in CUDA_KERNEL_DTYPES:
        raise ValueError(
            f"the CUDA attention kernels run in bfloat16 or float16, got {q.dtype}; cast q, k, v "
            f"or use the 'reference' backend for float32"
        )
    if q.shape[-1] not in CUDA_KERNEL_HEAD_DIMS:
        raise ValueError(
            f"the CUDA attention kernels support head_dim {CUDA_KERNEL_HEAD_DIMS}, got "
            f"{q.shape[-1]}; use the 'flex' or 'reference' backend"
        )
    if metadata.lo.device != q.device:
        raise ValueError(
            f"the block metadata is on {metadata.lo.device} but q is on {q.device}; call "
            f"prepare() with lo/hi on the activations' device"
        )


def cuda_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    metadata: BlockMetadata,
    scale: float | None = None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:
    """Masked GQA attention and its log-sum-exp through the CUDA kernels (differentiable in
    q, k, v, and through the log-sum-exp).

    Args:
        q: [Tq, Hq, D]; k, v: [T, Hkv, D]; bf16 or fp16 CUDA tensors, D in (64, 128).
        metadata: ``build_block_metadata(lo, hi, q_offset, Tq)`` of this micro-batch; with a
            query range other than all rows, forward only.
        scale: multiplies q . k; defaults to 1 / sqrt(D).
        deterministic: bitwise reproducible backward (slower).

    Returns:
        ``out`` [Tq, Hq, D] in q's dtype and ``lse`` [Tq, Hq] float32 (a transposed view of the
        kernels' [Hq, Tq]; ``-inf`` on rows that see no key, whose output is 0), the layout of
        ``attention_reference.reference_attention_with_lse``.
    """
    _check_kernel_inputs(q, k, v, metadata)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    out, lse = _attention_forward_op(
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


class CudaAttention(AttentionBackend):
    """Masked GQA attention through the modus_attn CUDA kernels."""

    name = "cuda"

    def __init__(self, deterministic: bool = False) -> None:
        """``deterministic``: make the backward bitwise reproducible (dQ without atomics)."""
        _require_extension()
        self.deterministic = deterministic

    def prepare(
        self, lo: Tensor, hi: Tensor, q_offset: int = 0, num_queries: int | None = None
    ) -> BlockMetadata:
        """Build the block metadata of this micro-batch on lo's CUDA device (no host sync).
        A query range other than all rows runs forward only."""
        check_lo_hi(lo, hi)
        if not lo.is_cuda:
            raise ValueError(
                f"the CUDA attention backend builds its metadata on the GPU; lo/hi are on "
                f"{lo.device}, move them to the activations' CUDA device"
            )
        return build_block_metadata(lo, hi, q_offset, num_queries)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, prepared: BlockMetadata, scale: float
    ) -> Tensor:
        """[Tq, Hq, D] masked attention in q's dtype; see ``AttentionBackend.forward``."""
        return cuda_attention_with_lse(q, k, v, prepared, scale, self.deterministic)[0]
