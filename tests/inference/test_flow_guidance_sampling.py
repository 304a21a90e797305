"""The sampling primitives of generation: the flow solver, guidance, and next-token choice."""

from __future__ import annotations

import pytest
import torch

from modus_mega.flow import interpolate, velocity_target
from modus_mega.inference.flow_sampler import flow_schedule, integrate_flow
from modus_mega.inference.guidance import GuidanceConfig, guide
from modus_mega.inference.token_sampling import TokenSampling, sample_token

# ----------------------------------------------------------------------------- flow solver


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_an_oracle_velocity_recovers_x0_for_any_step_count_and_shift(solver: str, num_steps: int, shift: float) -> None:
    """With the exact velocity eps - x0 every path is a straight line, so any grid lands on x0."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(12, 8, generator=gen, dtype=torch.float64), torch.randn(12, 8, generator=gen, dtype=torch.float64)
    seen: list[float] = []

    def oracle(x: torch.Tensor, t: float) -> torch.Tensor:
        seen.append(t)
        assert torch.allclose(x, interpolate(x0, eps, torch.full((12,), t, dtype=torch.float64)), atol=1e-9)
        return velocity_target(x0, eps)

    out = integrate_flow(oracle, eps, num_steps, shift, solver)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    assert seen[0] == 1.0 and all(0.0 < t <= 1.0 for t in seen)  # the model never sees t = 0


def test_schedule_follows_the_training_shift() -> None:
    times = flow_schedule(4, 3.0)
    plain = torch.linspace(1, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(times, 3 * plain / (1 + 2 * plain))
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[:-1] > times[1:]).all())
    with pytest.raises(ValueError, match="at least 1 step"):
        flow_schedule(0)


def test_heun_is_more_accurate_than_euler_on_a_curved_flow() -> None:
    """v = -x: integrating from t = 1 to 0 multiplies x by e; Heun (second order) gets much closer than Euler."""
    x1 = torch.ones(1, 1, dtype=torch.float64)
    exact = x1 * torch.exp(torch.tensor(1.0, dtype=torch.float64))

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return -x  # x <- x - dt * v = (1 + dt) x

    errors = {s: float((integrate_flow(velocity, x1, 8, 1.0, s) - exact).abs()) for s in ("euler", "heun")}
    assert errors["heun"] < errors["euler"] / 5, errors


# ----------------------------------------------------------------------------- guidance


def test_scale_one_is_the_conditional_output_and_needs_no_unconditional_pass() -> None:
    cond = torch.randn(5, 4)
    cfg = GuidanceConfig()
    assert not cfg.needs_unconditional
    assert guide([cond], None, cfg, t=0.5) is cond


@pytest.mark.parametrize("renorm", ["none", "global", "channel"])
def test_identical_branches_give_the_conditional_output_at_any_scale(renorm: str) -> None:
    cond = torch.randn(5, 4)
    for scale in (0.0, 2.5, 7.0):
        out = guide([cond], cond.clone(), GuidanceConfig(scales=(scale,), renorm=renorm), t=0.3)
        assert torch.equal(out, cond)


def test_weighted_multi_condition_guidance_and_interval() -> None:
    u, c1, c2 = torch.randn(3, 6, 4).unbind(0)
    cfg = GuidanceConfig(scales=(2.0, 0.5), interval=(0.2, 0.8))
    torch.testing.assert_close(guide([c1, c2], u, cfg, t=0.5), u + 2.0 * (c1 - u) + 0.5 * (c2 - u))
    assert guide([c1, c2], None, cfg, t=0.9) is c1  # outside the interval: the first branch, no unconditional pass
    assert guide([c1, c2], None, cfg, t=0.2) is c1  # the interval's lower end is open (BAGEL's t > lo)
    with pytest.raises(ValueError, match="no unconditional branch"):
        guide([c1, c2], None, cfg, t=0.5)


def test_renorm_caps_the_guided_norm_at_the_conditional_norm() -> None:
    u, c = torch.randn(2, 6, 4).unbind(0)
    raw = guide([c], u, GuidanceConfig(scales=(4.0,)), t=0.5)
    glob = guide([c], u, GuidanceConfig(scales=(4.0,), renorm="global"), t=0.5)
    chan = guide([c], u, GuidanceConfig(scales=(4.0,), renorm="channel"), t=0.5)
    assert float(glob.norm()) <= float(c.norm()) + 1e-5 and float(raw.norm()) > float(c.norm())
    torch.testing.assert_close(glob, raw * (c.norm() / raw.norm()))
    assert bool((chan.norm(dim=-1) <= c.norm(dim=-1) + 1e-5).all())
    floor = guide([c], u, GuidanceConfig(scales=(4.0,), renorm="global", renorm_min=1.0), t=0.5)
    torch.testing.assert_close(floor, raw)  # renorm_min = 1 disables it, as in BAGEL


@pytest.mark.parametrize(
    "kwargs, message",
    [({"scales": ()}, "at least one"), ({"interval": (0.5, 0.5)}, "interval"), ({"renorm": "l2"}, "renorm"),
     ({"renorm_min": 2.0}, "renorm_min"), ({"scales": (float("nan"),)}, "finite")],
)  # fmt: skip
def test_bad_guidance_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuidanceConfig(**kwargs)


# ----------------------------------------------------------------------------- next token


def test_greedy_respects_the_constraint() -> None:
    logits = torch.tensor([5.0, 1.0, 3.0, 4.0])
    allowed = torch.tensor([False, True, True, False])
    assert sample_token(logits, allowed, TokenSampling(), None) == 2
    with pytest.raises(ValueError, match="allows no token"):
        sample_token(logits, torch.zeros(4, dtype=torch.bool), TokenSampling(), None)


def test_sampling_is_seeded_and_filters_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    allowed = torch.ones(4, dtype=torch.bool)

    def draws(sampling: TokenSampling, seed: int = 0) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [sample_token(logits, allowed, sampling, gen) for _ in range(400)]

    free = TokenSampling(temperature=1.0)
    assert draws(free) == draws(free)  # same seed, same tokens
    assert set(draws(free)) == {0, 1, 2, 3}
    assert set(draws(TokenSampling(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draws(TokenSampling(temperature=1.0, top_p=0.8))) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(draws(TokenSampling(temperature=1.0, top_p=0.81))) == {0, 1, 2}
    assert set(draws(TokenSampling(temperature=1.0, top_p=0.1))) == {0}  # the top id always stays
    masked = [sample_token(logits, torch.tensor([False, True, True, True]), free, torch.Generator().manual_seed(1)) for _ in range(50)]
    assert 0 not in masked
