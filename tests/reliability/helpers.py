"""The fault-matrix modules (``bench/reliability/``, outside the package) for the tests."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conftest import REPO


def bench_module(name: str) -> ModuleType:
    """``bench/reliability/<name>.py``, imported once as ``name`` (as the matrix command imports its siblings)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "reliability" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


def checkpoint_cases() -> ModuleType:
    """``bench/reliability/checkpoint_cases.py``: the checkpoint rows of the fault matrix."""
    return bench_module("checkpoint_cases")
