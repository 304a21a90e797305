"""The 2D-token input modules: timestep embedding, 2D sin-cos tables, the ViT connector.

Numeric conventions follow BAGEL (DESIGN §1): timestep features are [cos, sin] with
t in [0, 1] (not x1000); 2D sin-cos rows are [sin(c w), cos(c w), sin(r w), cos(r w)],
computed in float64 and then cast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [N, dim] of flow times t [N]: [cos(t f), sin(t f)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Linear-SiLU-Linear over sinusoidal features of the flow time (BAGEL's ``time_embedder``)."""

    def __init__(self, hidden_size: int, frequency_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


def sincos_2d_table(side: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos table [side*side, dim], float64; row r*side + c encodes (row r, col c)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos table width {dim} must be a multiple of 4")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))  # [dim/4]
    rows, cols = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    col_args = cols.reshape(-1, 1) * omega[None, :]  # [side*side, dim/4]
    row_args = rows.reshape(-1, 1) * omega[None, :]
    return torch.cat([col_args.sin(), col_args.cos(), row_args.sin(), row_args.cos()], dim=1)


class SinCos2DPositionEmbedding(nn.Module):
    """A frozen 2D sin-cos table indexed by ``row * side + col`` (BAGEL's ``PositionEmbedding``)."""

    def __init__(self, side: int, dim: int) -> None:
        super().__init__()
        self.side = side
        # A frozen parameter (not a buffer) so checkpoints carry it under BAGEL's key name.
        self.pos_embed = nn.Parameter(sincos_2d_table(side, dim).float(), requires_grad=False)

    def reset_parameters(self) -> None:
        """Refill the table (after a meta-device build)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.side, self.pos_embed.shape[1]))

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.pos_embed[position_ids]


class MLPConnector(nn.Module):
    """ViT width -> LLM width: fc1, gelu-tanh, fc2 (BAGEL's ``connector``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
