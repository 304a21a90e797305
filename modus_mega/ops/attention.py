"""The attention contract of DESIGN §4 and the one place that picks its implementation.

Legend: T = tokens in the packed micro-batch, Hq = query heads, Hkv = key/value heads,
g = Hq // Hkv (GQA group), D = head dim.

For every query token q and query head h, a backend computes

    out[q, h] = sum_k softmax_k(scale * q[q, h] . k[k, h // g]) * v[k, h // g]

over the keys k with ``lo[k] <= q < hi[k]`` (the column intervals of ``ops.mask``). KV head
j serves query heads j*g .. j*g+g-1 (``repeat_interleave``, BAGEL's GQA). A query row that
sees no key gives 0 (our layouts never make one).

A backend splits the work in two: ``prepare(lo, hi)`` builds the per-micro-batch metadata
once (block masks, tile lists), and every layer calls ``forward(q, k, v, prepared, scale)``.

``get_attention_backend`` is the only place that chooses between the implementations:

    reference  plain PyTorch, exact forward and backward (CPU runs, tests, fp32 oracle)
    flex       torch FlexAttention with a BlockMask from lo/hi (GPU fallback)
    cuda       the CUDA extension in csrc/ (``modus_mega.ops.cuda_attention``), GPU runs

``choose_attention_backend`` is that choice as a pure function of (name, device type, head
dim, dtype, extension built).

Queries over a cache (DESIGN §8): ``prepare(lo, hi, q_offset, num_queries)`` describes Tq
query rows at absolute positions ``q_offset .. q_offset + Tq - 1`` of the Tk keys that lo/hi
describe (``0 <= q_offset``, ``q_offset + Tq <= Tk``; Tq defaults to Tk - q_offset, the last
rows). Query row r then sees key k iff ``lo[k] <= q_offset + r < hi[k]``: exactly row
``q_offset + r`` of the full-sequence attention over the same keys, whatever the offset. The
default (q_offset 0, Tq = Tk) is the training path, unchanged. Which offsets a KV cache may
use is a different question (the cached keys must not depend on later tokens):
``mask.cache_boundaries``.
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from typing import Any, Literal, get_args

import torch
from torch import Tensor

AttentionBackendName = Literal["auto", "reference", "flex", "cuda"]

_BACKEND_NAMES: tuple[str, ...] = get_args(AttentionBackendName)


class AttentionBackend(ABC):
    """One implementation of the masked GQA attention of DESIGN §4."""

    name: str  # what logs and errors call this backend

    @abstractmethod
    def prepare(
        self, lo: Tensor, hi: Tensor, q_offset: int = 0, num_queries: int | None = None
    ) -> Any:
        """Build the metadata of one micro-batch from its int32 ``lo, hi`` [Tk].

        Called once per micro-batch; the result is passed to ``forward`` of every layer.
        ``q_offset``, ``num_queries``: the queries are the rows ``q_offset ..
        q_offset + num_queries - 1`` of the keys (module docstring); the defaults are all rows.
        """

    @abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, scale: float) -> Tensor:
        """Masked attention of one micro-batch.

        Args:
            q: [Tq, Hq, D] queries (Tq = Tk unless ``prepare`` was given a query range).
            k: [Tk, Hkv, D] keys; Hq % Hkv == 0.
            v: [Tk, Hkv, D] values.
            prepared: what ``prepare`` returned for this micro-batch.
            scale: multiplies q . k before the softmax (usually 1 / sqrt(D)).

        Returns:
            [Tq, Hq, D] in q's dtype, contiguous.
        """


def check_qkv(
    q: Tensor, k: Tensor, v: Tensor, num_tokens: int, num_queries: int | None = None
) -> None:
    """Check q [Tq, Hq, D], k and v [Tk, Hkv, D] (one dtype, one device, Hq % Hkv == 0)
    against the Tk = ``num_tokens`` keys and Tq = ``num_queries`` (default Tk) rows that
    ``prepare`` was given."""
    num_queries = num_tokens if num_queries is None else num_queries
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [tokens, heads, head_dim], got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if q.shape[0] != num_queries or k.shape[0] != num_tokens:
        raise ValueError(
            f"q has {q.shape[0]} tokens and k has {k.shape[0]}, but lo/hi describe {num_tokens} "
            f"keys and {num_queries} query rows; prepare() must be called with this micro-batch's "
            f"lo/hi (and its query range)"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k head dims differ: {q.shape[2]} vs {k.shape[2]}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")


# What the CUDA kernels run (csrc/modus_attn); ``auto`` picks them only inside this envelope.
CUDA_KERNEL_HEAD_DIMS: tuple[int, ...] = (64, 128)
CUDA_KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)

ChosenBackend = Literal["reference", "flex", "cuda"]


def _load_cuda_backend() -> tuple[type[AttentionBackend] | None, str]:
    """The CUDA extension's backend class, or None and the reason it is unavailable."""
    try:
        cuda_attention = importlib.import_module("modus_mega.ops.cuda_attention")
    except ImportError as error:
        return None, f"modus_mega.ops.cuda_attention cannot be imported ({error})"
    if not cuda_attention.HAVE_CUDA_ATTENTION:
        return None, "modus_mega.ops.cuda_attention reports HAVE_CUDA_ATTENTION = False"
    return cuda_attention.CudaAttention, ""


def _cuda_kernels_refuse(head_dim: int | None, dtype: torch.dtype | None) -> str:
    """Why the CUDA kernels cannot run this case ("" when they can, or when it is unknown)."""
    if head_dim is not None and head_dim not in CUDA_KERNEL_HEAD_DIMS:
        return f"the CUDA kernels support head_dim {CUDA_KERNEL_HEAD_DIMS}, got {head_dim}"
    if dtype is not None and dtype not in CUDA_KERNEL_DTYPES:
        return f"the CUDA kernels run in {CUDA_KERNEL_DTYPES}, got {dtype}"
    return ""


def choose_attention_backend(
    name: AttentionBackendName,
    device_type: str,
    head_dim: int | None,
    dtype: torch.dtype | None,
    extension_built: bool,
    unavailable_reason: str = "",
) -> ChosenBackend:
    """Which implementation serves ``name`` for this case: the pure rule behind
    ``get_attention_backend`` (tests fake ``extension_built`` on any machine).

    ``auto``: the CUDA extension when it is built, the device is CUDA, and ``head_dim`` and
    ``dtype`` are both given and inside what the kernels run (``CUDA_KERNEL_HEAD_DIMS``,
    ``CUDA_KERNEL_DTYPES``); else FlexAttention on CUDA (compiled; any head dim and dtype);
    else the reference. An unknown head dim or dtype never picks the extension, so ``auto``
    cannot choose a backend whose first forward raises.

    Raises:
        ValueError: an unknown name, or ``cuda`` where it cannot run, naming the fix.
    """
    if name not in _BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; use one of {_BACKEND_NAMES}")
    on_cuda = device_type == "cuda"
    refusal = _cuda_kernels_refuse(head_dim, dtype)
    if name == "reference" or name == "flex":
        return name
    if name == "cuda":
        if not on_cuda:
            raise ValueError(
                f"attention backend 'cuda' runs on CUDA devices only, got device type "
                f"{device_type!r}; use 'auto' or 'reference' for CPU runs"
            )
        if not extension_built:
            raise ValueError(
                f"attention backend 'cuda' is not available: {unavailable_reason}. Build the "
                f"extension on a CUDA machine (pip install --no-build-isolation -e .[gpu]) or set "
                f"model.attention_backend to 'auto' or 'flex'"
            )
        if refusal:
            raise ValueError(
                f"attention backend 'cuda' cannot run this model: {refusal}; set "
                f"model.attention_backend to 'auto' or 'flex'"
            )
        return "cuda"
    # name == "auto"
    if not on_cuda:
        return "reference"
    known = head_dim is not None and dtype is not None
    return "cuda" if extension_built and known and not refusal else "flex"


def get_attention_backend(
    name: AttentionBackendName,
    device: torch.device | str,
    *,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
) -> AttentionBackend:
    """Build the attention implementation of a run; the one place that picks.

    Call it once per run and keep the object: a compiled FlexAttention is built once per
    backend object, so a new object per micro-batch would compile again every step.

    Args:
        name: ``auto`` or an explicit backend (``choose_attention_backend`` has the rule).
        device: where the activations live.
        head_dim: the model's attention head dim; ``auto`` picks the CUDA extension only
            when it is given and supported.
        dtype: the dtype q, k, v reach attention in (bf16 under mixed precision); same rule.

    ``"flex"`` on CPU runs forward only (torch has no CPU backward for FlexAttention), which
    ``forward`` enforces.
    """
    # Imported here: the backend modules subclass AttentionBackend from this module.
    from modus_mega.ops.attention_flex import FlexAttention
    from modus_mega.ops.attention_reference import ReferenceAttention

    device = torch.device(device)
    cuda_backend, reason = (None, "") if name not in ("auto", "cuda") else _load_cuda_backend()
    chosen = choose_attention_backend(
        name, device.type, head_dim, dtype, cuda_backend is not None, reason
    )
    if chosen == "cuda":
        assert cuda_backend is not None
        return cuda_backend()
    if chosen == "flex":
        return FlexAttention(compiled=device.type == "cuda")
    return ReferenceAttention()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lo: Tensor,
    hi: Tensor,
    *,
    scale: float | None = None,
    backend: AttentionBackendName = "auto",
) -> Tensor:
    """One-shot masked attention: ``prepare(lo, hi)`` then ``forward``.

    For tests and single calls; a model prepares once per micro-batch and reuses the result
    in every layer instead.

    Args:
        q: [T, Hq, D]; k, v: [T, Hkv, D]; lo, hi: int32 [T] (DESIGN §4).
        scale: defaults to 1 / sqrt(D).
        backend: see ``get_attention_backend``; picked for q's device, head dim and dtype.

    Returns:
        [T, Hq, D] in q's dtype.
    """
    impl = get_attention_backend(backend, q.device, head_dim=q.shape[-1], dtype=q.dtype)
    prepared = impl.prepare(lo, hi)
    return impl.forward(q, k, v, prepared, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
