"""Sampling a 2D target: integrate the flow ODE from noise (t = 1) to data (t = 0).

Training's convention (``modus_mega/flow.py``, BAGEL's): ``x_t = (1 - t) x0 + t eps`` and
the model predicts the velocity ``v = dx_t/dt = eps - x0``. Sampling walks the time grid
``t_0 = 1 > t_1 > ... > t_N = 0`` (``flow_schedule``: a uniform grid passed through the
training shift ``s t / (1 + (s - 1) t)``; BAGEL samples with 50 steps and shift 3, MODUS
trains with shift 1) and moves ``x <- x - (t_i - t_{i+1}) v`` (Euler), or averages the
slopes at both ends of a step (Heun, second order; the last step falls back to Euler, since
the velocity at t = 0 is outside the training range).

Shapes: N tokens of a 2D split, P latent patch dim.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from modus_mega.flow import shift_timesteps

FlowSolver = Literal["euler", "heun"]
FLOW_SOLVERS: tuple[str, ...] = ("euler", "heun")

# velocity(x_t [N, P], t: float in (0, 1]) -> v [N, P]
VelocityFn = Callable[[Tensor, float], Tensor]


def flow_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """The time grid [num_steps + 1] float64: ``shift(linspace(1, 0, num_steps + 1))``, from 1 down to 0.

    Raises ``ValueError`` for fewer than one step or a non-positive shift.
    """
    if num_steps < 1:
        raise ValueError(f"a flow sampler needs at least 1 step, got {num_steps}; use e.g. --steps 30")
    if not shift > 0:
        raise ValueError(f"the timestep shift must be > 0, got {shift}; 1 is no shift, BAGEL samples with 3")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def integrate_flow(
    velocity: VelocityFn, noise: Tensor, num_steps: int, shift: float = 1.0, solver: FlowSolver = "euler"
) -> Tensor:
    """Clean latents x0 [N, P] from ``noise`` [N, P] (x at t = 1) by ``num_steps`` solver steps.

    ``velocity`` is called once per Euler step and twice per Heun step (once on the last),
    with plain float times, so a caller can key guidance intervals and caches on them.
    """
    if solver not in FLOW_SOLVERS:
        raise ValueError(f"unknown flow solver {solver!r}; choose one of {list(FLOW_SOLVERS)}")
    times = flow_schedule(num_steps, shift).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t - t_next  # > 0: time runs from noise to data
        v = velocity(x, t)
        x_euler = x - dt * v
        if solver == "euler" or t_next == 0.0:
            x = x_euler
        else:
            x = x - dt * 0.5 * (v + velocity(x_euler, t_next))
    return x
