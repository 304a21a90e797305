"""Learning-rate schedule: linear warm-up, then constant or cosine decay to ``min_lr``."""

from __future__ import annotations

import math

from modus_mega.config import OptimConfig


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
