"""Building blocks of the decoder: RMSNorm, RoPE, SwiGLU, and the linear-layer seam.

Shape legend: T tokens in the packed micro-batch, D model width, H heads, Dh head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32 (Qwen2 / BAGEL)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables [T, Dh] for Hugging Face's rotate_half RoPE (pairs i, i + Dh/2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [T, H, Dh] by per-token angles; cos/sin are [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass(frozen=True)
class LinearFactory:
    """The one seam that picks the linear layers (STYLE 2).

    ``column`` shards its output features under tensor parallelism, ``row`` its input
    features; ``embedding`` shards the vocabulary. Every module returned must map
    ``x -> y`` (a plain tensor). The serial factory below uses torch.nn; the parallel
    ones live in ``modus_mega/parallel``.
    """

    column: Callable[[int, int, bool], nn.Module]  # (in_features, out_features, bias)
    row: Callable[[int, int, bool], nn.Module]  # (in_features, out_features, bias)
    embedding: Callable[[int, int], nn.Module]  # (num_embeddings, dim)
    tp_size: int = 1  # heads and MLP width are divided by this on each rank


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


SERIAL_LINEARS = LinearFactory(column=_linear, row=_linear, embedding=nn.Embedding, tp_size=1)


class SwiGLU(nn.Module):
    """Qwen2's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, linears: LinearFactory) -> None:
        super().__init__()
        self.gate_proj = linears.column(dim, hidden, False)
        self.up_proj = linears.column(dim, hidden, False)
        self.down_proj = linears.row(hidden, dim, False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
