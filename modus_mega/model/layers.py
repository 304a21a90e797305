"""Building blocks of the decoder: RMSNorm, RoPE, SwiGLU, and the linear-layer seam.

Shape legend: T tokens in the packed micro-batch, D model width, H heads, Dh head_dim,
R rows of the residual stream a rank holds (T, or a 1/tp share under sequence parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from modus_mega.model.mot import LayerContext


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


class Collectives:
    """The collectives the model makes around its tensor-parallel linears; this base class is the serial one (none).

    Under tensor parallelism the factory's column-parallel linears leave their input gradient
    as this rank's partial sum and its row-parallel linears return this rank's partial sum,
    so a decoder layer communicates once per block for both experts' tokens (Megatron-core's
    "explicit expert communication") through these methods. ``modus_mega/parallel`` holds the
    tensor- and sequence-parallel versions; under sequence parallelism a rank holds only a
    contiguous share of the residual stream (``num_shards`` of them, ``shard`` its own).
    """

    num_shards: int = 1  # the residual stream is split into this many equal runs of rows
    shard: int = 0  # the run this rank holds

    def scatter(self, hidden: Tensor) -> Tensor:
        """This rank's rows [R, D] of the decoder's input [T, D] (the same on every rank)."""
        return hidden

    def gather(self, rows: Tensor, num_tokens: int) -> Tensor:
        """The decoder's output [T, D] on every rank from each rank's rows [R, D].

        Whatever follows must compute the same gradient on every rank (the heads do).
        """
        return rows

    def project(self, rows: list[Tensor], ctx: "LayerContext", fn: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
        """``fn`` over each expert's tokens of the whole sequence; its inputs are column-parallel linears.

        ``rows``: per expert, its normed rows on this rank [R_e, D]; ``fn`` gets per expert
        all of its tokens [T_e, D] and returns the linears' outputs, which this returns.
        """
        return fn(rows)

    def reduce(self, partial: Tensor, ctx: "LayerContext") -> Tensor:
        """This rank's rows [R, D] of the sum over ranks of row-parallel outputs [T, D] (sequence order)."""
        return partial

    def copy(self, x: Tensor) -> Tensor:
        """The input of a column-parallel head, whole on every rank: the identity, its gradient summed over ranks."""
        return x


SERIAL_COLLECTIVES = Collectives()


@dataclass(frozen=True)
class LinearFactory:
    """The one seam that picks the linear layers (STYLE 2).

    ``column`` shards its output features under tensor parallelism, ``row`` its input
    features; ``embedding`` shards the vocabulary. Every module returned must map
    ``x -> y`` (a plain tensor). ``collectives`` are what the model calls around them (the
    parallel linears make none themselves). The serial factory below uses torch.nn; the
    parallel ones live in ``modus_mega/parallel``.
    """

    column: Callable[[int, int, bool], nn.Module]  # (in_features, out_features, bias)
    row: Callable[[int, int, bool], nn.Module]  # (in_features, out_features, bias)
    embedding: Callable[[int, int], nn.Module]  # (num_embeddings, dim)
    tp_size: int = 1  # heads and MLP width are divided by this on each rank
    collectives: Collectives = SERIAL_COLLECTIVES  # matches the linears' partial sums


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
