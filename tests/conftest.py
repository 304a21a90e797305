"""Shared test fixtures: the tiny config and a deterministic default dtype."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from modus_mega.config import ModusConfig, load_config

# Runs started by tests log nowhere but their JSONL; the wandb test opts in explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
_TINY = load_config(REPO / "configs" / "tiny.json")


@pytest.fixture
def tiny_config() -> ModusConfig:
    """A fresh copy of configs/tiny.json (tests may mutate it)."""
    return copy.deepcopy(_TINY)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
