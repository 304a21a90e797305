"""BAGEL's numeric conventions for the 2D-token inputs, written out by hand (DESIGN §1)."""

from __future__ import annotations

import math

import torch

from modus_mega.config import TimestepConfig
from modus_mega.flow import interpolate, sample_timesteps, shift_timesteps, velocity_target
from modus_mega.model.embeddings import sincos_2d_table, timestep_features


def test_timestep_features_are_cos_then_sin_with_t_in_unit_range() -> None:
    t = torch.tensor([0.0, 0.37, 1.0])
    out = timestep_features(t, 8)
    for row, tv in zip(out.tolist(), t.tolist()):
        freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(row, expected))


def test_sincos_2d_rows_are_column_first_sin_first() -> None:
    side, dim = 3, 8
    table = sincos_2d_table(side, dim)
    assert table.dtype == torch.float64 and table.shape == (side * side, dim)
    w = [10000 ** (-i / (dim / 4)) for i in range(dim // 4)]
    for r in range(side):
        for c in range(side):
            expected = (
                [math.sin(c * x) for x in w] + [math.cos(c * x) for x in w]
                + [math.sin(r * x) for x in w] + [math.cos(r * x) for x in w]
            )  # fmt: skip
            assert torch.allclose(table[r * side + c], torch.tensor(expected, dtype=torch.float64))


def test_flow_conventions() -> None:
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt = interpolate(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[-1], eps[-1])  # t = 1 is pure noise
    assert torch.allclose(xt[2], 0.5 * x0[2] + 0.5 * eps[2])
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(shift_timesteps(s, 3.0), 3 * s / (1 + 2 * s))
    assert torch.equal(shift_timesteps(s, 1.0), s)


def test_timestep_samplers() -> None:
    g = torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, TimestepConfig(), g)
    assert uniform.min() > 0 and uniform.max() <= 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    logit = sample_timesteps(20000, TimestepConfig(sampler="logit_normal", logit_mean=1.0), g)
    assert abs(float(torch.logit(logit.double()).mean()) - 1.0) < 0.03
    shifted = sample_timesteps(20000, TimestepConfig(shift=3.0), g)
    assert float(shifted.mean()) > 0.6  # the shift moves mass towards noise
