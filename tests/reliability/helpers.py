"""The checkpoint fault module (``bench/reliability/checkpoint_faults.py``, outside the package) for the tests."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conftest import REPO


def checkpoint_faults() -> ModuleType:
    """``bench/reliability/checkpoint_faults.py``, imported once as ``checkpoint_faults``."""
    if "checkpoint_faults" not in sys.modules:
        spec = importlib.util.spec_from_file_location("checkpoint_faults", REPO / "bench" / "reliability" / "checkpoint_faults.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up there
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["checkpoint_faults"]
