"""FP8 with Transformer Engine (``parallel.tp_backend = "te"``, GPU only), behind ``HAVE_TE`` (STYLE 8).

TE's linears (``parallel/te.py``) run their matmuls in FP8 inside ``te.fp8_autocast`` with a
recipe; nothing is converted. Recipes (``training.fp8.te_recipe``), both with TE's HYBRID
format (e4m3 forward, e5m2 gradients):

- ``delayed``: each tensor's scale comes from the max over its last ``amax_history_len``
  amaxes (TE's ``DelayedScaling``). The history and scales live in each TE module's extra
  state, which its ``state_dict`` carries (``_extra_state``), so DeepSpeed's checkpoints save
  and restore them; a TE linear has that key in every precision, so a run may resume in
  another precision.
- ``current``: each tensor is scaled by its own amax of this step (TE's
  ``Float8CurrentScaling``), like torchao's tensorwise recipe.

The amaxes are reduced over the tp group (``fp8_group``): TE's linears here hold one rank's
slice and communicate nothing, so this keeps the scales those of the whole tensor, as the
torchao path does (``parallel/fp8_torchao.py``). Untested on the CPU-only CI machines.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch.distributed as dist

from modus_mega.config import Float8Config
from modus_mega.parallel.te import HAVE_TE, te

if HAVE_TE:
    from transformer_engine.common import recipe as te_recipes


def build_te_recipe(cfg: Float8Config) -> object:
    """TE's recipe object for ``cfg.te_recipe``; raises ``ValueError`` without TE or for a TE too old for it."""
    if not HAVE_TE:
        raise ValueError(
            "training.fp8 with parallel.tp_backend='te' needs Transformer Engine, which is not installed; "
            "install it on a GPU machine or use tp_backend='local' (torchao FP8)"
        )
    fmt = te_recipes.Format.HYBRID  # e4m3 forward, e5m2 gradients
    if cfg.te_recipe == "delayed":
        return te_recipes.DelayedScaling(fp8_format=fmt, amax_history_len=cfg.amax_history_len, amax_compute_algo="max")
    if not hasattr(te_recipes, "Float8CurrentScaling"):
        raise ValueError("training.fp8.te_recipe='current' needs Transformer Engine 2.2 or newer; upgrade it or use 'delayed'")
    return te_recipes.Float8CurrentScaling(fp8_format=fmt)


def te_fp8_autocast(cfg: Float8Config, tp_group: dist.ProcessGroup | None) -> AbstractContextManager:
    """The context a forward runs in for TE's linears to compute in FP8 (amaxes reduced over ``tp_group``)."""
    recipe = build_te_recipe(cfg)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=tp_group)
