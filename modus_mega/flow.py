"""Flow-matching conventions (BAGEL's): x_t = (1 - t) x0 + t eps, t = 1 is pure noise.

The model predicts the velocity dx_t/dt = eps - x0. Flow times are sampled per noisy
image split: uniform by default (MODUS), or logit-normal; an optional shift
t <- s t / (1 + (s - 1) t) moves mass towards noise for s > 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modus_mega.config import TimestepConfig


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Apply the resolution shift ``s t / (1 + (s - 1) t)``; ``shift = 1`` is the identity."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(num: int, cfg: TimestepConfig, generator: torch.Generator) -> Tensor:
    """``num`` flow times in (0, 1] drawn from the configured sampler, then shifted."""
    if cfg.sampler == "uniform":
        # 1 - U[0, 1) lies in (0, 1]: t = 0 would be a clean image with a zero-information target.
        t = 1.0 - torch.rand(num, generator=generator, dtype=torch.float64)
    else:
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(num, generator=generator, dtype=torch.float64))
    return shift_timesteps(t, cfg.shift).float()


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t [N, P] from clean latents x0 [N, P], noise [N, P] and per-token times t [N]."""
    t = t.to(x0.dtype)[:, None]
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target eps - x0 (points from data to noise)."""
    return noise - x0
