"""Shared planner fixtures: the 7B config and its parameter placement, built once per session."""

from __future__ import annotations

import pytest

from modus_mega.config import ModusConfig, load_config
from modus_mega.plan.calibration import Calibration, load_calibration
from modus_mega.plan.shapes import ModelShape, model_shape
from tests.conftest import REPO


@pytest.fixture(scope="session")
def config_7b() -> ModusConfig:
    """configs/7b.json (treat as read-only)."""
    return load_config(REPO / "configs" / "7b.json")


@pytest.fixture(scope="session")
def shape_7b(config_7b: ModusConfig) -> ModelShape:
    """Parameter placement of the 7B model (meta-device build)."""
    return model_shape(config_7b.model)


@pytest.fixture(scope="session")
def h100() -> Calibration:
    """bench/calibration/h100.json."""
    return load_calibration()
