"""Choosing the next 1D token from logits: greedy, temperature, top-k, top-p, under a constraint.

The constraint is a boolean mask over the vocabulary of what the modality's grammar allows
at this position (``inference/constraints.py`` builds it); disallowed ids get probability 0
before any filtering, so a sampled sequence always parses. Sampling draws from the caller's
``torch.Generator``, seeded per request and target, so the same seed gives the same tokens.

Shapes: V vocabulary rows (the padded vocabulary of the LM head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenSampling:
    """How the next token is chosen. ``temperature = 0`` is greedy (top-k / top-p then unused)."""

    temperature: float = 0.0  # 0: argmax; > 0: softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely ids (0: all)
    top_p: float = 1.0  # keep the smallest set of most likely ids whose mass reaches p (1: all)

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every id), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] (1 keeps every id), got {self.top_p}")


def sample_token(logits: Tensor, allowed: Tensor, sampling: TokenSampling, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` [V] restricted to ``allowed`` [V] bool.

    Raises ``ValueError`` if nothing is allowed (a grammar bug, never a model's fault).
    """
    if not bool(allowed.any()):
        raise ValueError("the decoding constraint allows no token at this position")
    masked = logits.float().masked_fill(~allowed, float("-inf"))  # [V]
    if sampling.temperature == 0.0:
        return int(torch.argmax(masked))
    scores = masked / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, int(allowed.sum()))).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        scores = _top_p_filter(scores, sampling.top_p)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p_filter(scores: Tensor, top_p: float) -> Tensor:
    """Keep the most likely ids whose cumulative probability first reaches ``top_p`` (the top id always)."""
    sorted_scores, order = torch.sort(scores, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(sorted_scores, dim=-1) >= top_p  # mass before this id already reached p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
