"""Classifier-free guidance for both target families (DESIGN §8).

A guided prediction combines a conditional branch c (the context with its conditions) and an
unconditional one u (the target's ``<start:m>`` marker alone, or the context minus a chosen set
of conditions): ``u + w (c - u)``. With several conditional branches (one per condition or per
group of conditions) the weighted form ``u + sum_i w_i (c_i - u)`` guides each separately.

BAGEL's options for 2D targets (its ``inferencer.py`` at 056b5fd):
- a guidance interval: guidance applies only at flow times t with ``lo < t <= hi``; outside it
  the conditional branch is used alone (and no unconditional pass is needed);
- renormalisation: the guided velocity is scaled by ``clamp(|c| / |guided|, renorm_min, 1)``,
  with the norm over the whole split (``global``) or per token over channels (``channel``), so
  guidance never makes the velocity longer than the conditional one. The reference ``c`` of the
  weighted form is the first conditional branch.

Scale 1 with a single branch returns the conditional prediction itself (bit for bit): callers
check ``GuidanceConfig.needs_unconditional`` and then run no unconditional pass. For 1D targets
the same combination applies to logits (BAGEL's text CFG), before sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

RenormKind = Literal["none", "global", "channel"]
RENORM_KINDS: tuple[str, ...] = ("none", "global", "channel")


@dataclass(frozen=True)
class GuidanceConfig:
    """How the branches of one target are combined."""

    scales: tuple[float, ...] = (1.0,)  # w_i per conditional branch; (1.0,) = no guidance
    interval: tuple[float, float] = (0.0, 1.0)  # 2D: guide only at flow times lo < t <= hi
    renorm: RenormKind = "none"  # 2D: rescale the guided velocity to at most the conditional norm
    renorm_min: float = 0.0  # lower clamp of the renorm factor (BAGEL's cfg_renorm_min)

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("guidance needs at least one scale (one per conditional branch); (1.0,) is no guidance")
        if any(not (s == s and abs(s) != float("inf")) for s in self.scales):
            raise ValueError(f"guidance scales must be finite numbers, got {self.scales}")
        lo, hi = self.interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"guidance interval {self.interval} must satisfy 0 <= lo < hi <= 1; (0, 1) guides every step")
        if self.renorm not in RENORM_KINDS:
            raise ValueError(f"unknown guidance renorm {self.renorm!r}; choose one of {list(RENORM_KINDS)}")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError(f"guidance renorm_min must lie in [0, 1], got {self.renorm_min}")

    @property
    def needs_unconditional(self) -> bool:
        """Whether any unconditional pass is needed at all (a single branch at scale 1 needs none)."""
        return not (len(self.scales) == 1 and self.scales[0] == 1.0)

    def active_at(self, t: float | None) -> bool:
        """Whether guidance applies at flow time ``t`` (``None``: a 1D target, always)."""
        if not self.needs_unconditional:
            return False
        return t is None or self.interval[0] < t <= self.interval[1]


def guide(conditional: Sequence[Tensor], unconditional: Tensor | None, cfg: GuidanceConfig, t: float | None = None) -> Tensor:
    """The guided prediction from branch outputs of equal shape ([N, P] velocities or [V] logits).

    ``conditional``: one output per scale of ``cfg``; ``unconditional`` may be None where
    ``cfg.active_at(t)`` is false (then the first conditional branch is returned unchanged).
    """
    if len(conditional) != len(cfg.scales):
        raise ValueError(f"{len(conditional)} conditional branches for {len(cfg.scales)} guidance scales")
    reference = conditional[0]
    if not cfg.active_at(t):
        return reference
    if unconditional is None:
        raise ValueError("guidance is active at this step but no unconditional branch was computed")
    guided = unconditional.clone()
    for scale, branch in zip(cfg.scales, conditional):
        guided += scale * (branch - unconditional)
    if cfg.renorm == "none":
        return guided
    return guided * _renorm_factor(reference, guided, cfg.renorm, cfg.renorm_min)


def _renorm_factor(reference: Tensor, guided: Tensor, kind: RenormKind, minimum: float) -> Tensor:
    """``clamp(|reference| / |guided|, minimum, 1)`` over the whole tensor or per row ([N, 1])."""
    if kind == "global":
        ratio = torch.linalg.vector_norm(reference) / (torch.linalg.vector_norm(guided) + 1e-8)
    else:
        ratio = torch.linalg.vector_norm(reference, dim=-1, keepdim=True) / (
            torch.linalg.vector_norm(guided, dim=-1, keepdim=True) + 1e-8
        )
    return ratio.clamp(min=minimum, max=1.0)
