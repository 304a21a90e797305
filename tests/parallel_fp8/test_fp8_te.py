"""The Transformer Engine FP8 seam (``parallel/fp8_te.py``): recipes where TE is installed, a clear error where not."""

from __future__ import annotations

import pytest

from modus_mega.config import Float8Config
from modus_mega.parallel.fp8_te import build_te_recipe
from modus_mega.parallel.te import HAVE_TE


@pytest.mark.skipif(HAVE_TE, reason="Transformer Engine is installed")
def test_without_te_the_recipe_names_the_fix() -> None:
    with pytest.raises(ValueError, match="use tp_backend='local'"):
        build_te_recipe(Float8Config())


@pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine (GPU machines)")
def test_delayed_recipe_keeps_the_configured_history() -> None:
    from transformer_engine.common import recipe

    built = build_te_recipe(Float8Config(te_recipe="delayed", amax_history_len=16))
    assert isinstance(built, recipe.DelayedScaling)
    assert built.amax_history_len == 16 and built.fp8_format == recipe.Format.HYBRID


@pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine (GPU machines)")
def test_current_scaling_recipe() -> None:
    from transformer_engine.common import recipe

    if not hasattr(recipe, "Float8CurrentScaling"):
        pytest.skip("this Transformer Engine predates current scaling")
    assert isinstance(build_te_recipe(Float8Config(te_recipe="current")), recipe.Float8CurrentScaling)
