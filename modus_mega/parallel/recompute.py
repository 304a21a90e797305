"""Activation recomputation (``parallel.recompute``), applied to a built model from outside it.

With ``recompute = "full"`` a recomputed layer keeps only its inputs during the forward
and runs again in the backward to rebuild what the gradient needs: the saved activations
of the layer's inside (norm outputs, q/k/v, attention output, the SwiGLU's inner
[T, intermediate] tensors) are traded for one more forward of the layer. The decoder
layers recomputed are the first ``parallel.recompute_layers`` (0 = all of them, Megatron's
``recompute_num_layers`` with the "block" method); every ViT encoder layer is recomputed
under ``full``, since its cost is small next to the decoder's.

The mechanism is ``torch.utils.checkpoint`` without re-entrance, applied by replacing the
``forward`` of each chosen layer INSTANCE. Unlike a wrapper module this keeps every
parameter name and module type as they are, so checkpoints, DeepSpeed's parameter names,
the EMA and the BAGEL key map see the same model with and without recomputation. The
recomputed forward runs the layer's submodules through their ``__call__``, so hooks that
DeepSpeed ZeRO-3 puts on them (parameter gathering) run again in the recomputation.
Recomputation is deterministic here: no dropout, and the RNG state is restored anyway.

It is one step of the construction order written in ``parallel/build.py`` (build,
tensor-parallel linears, [FP8], initialise by name, freeze, recompute, [compile]), applied
to a whole model at pp = 1 and to this rank's pipeline stage at pp > 1; ``training/engine.py``
then hands the model to ``deepspeed.initialize``.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from modus_mega.config import ParallelConfig
from modus_mega.model.modus import decoder_layers


def _recomputed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The class's forward of ``module`` under non-reentrant activation checkpointing."""
    return checkpoint(type(module).forward, module, *args, use_reentrant=False, **kwargs)


def recompute_module(module: nn.Module) -> None:
    """Make ``module`` recompute its forward in the backward instead of keeping its activations.

    Raises ``ValueError`` when ``module`` already carries an instance-level ``forward``
    (recomputed twice, or patched by someone else), which this would silently replace.
    """
    if "forward" in vars(module):
        raise ValueError(
            f"{type(module).__name__} already has an instance forward (recomputation applied twice?); "
            "call apply_activation_checkpointing once per model"
        )
    module.forward = types.MethodType(_recomputed_forward, module)


def is_recomputed(module: nn.Module) -> bool:
    """Whether ``recompute_module`` was applied to ``module``."""
    forward = vars(module).get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _recomputed_forward


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig, num_layers: int | None = None) -> list[str]:
    """Apply ``cfg.recompute`` / ``cfg.recompute_layers`` to the layers ``model`` holds, in place.

    ``model`` is a ``ModusModel`` or one pipeline stage of it (which holds some decoder
    layers under their global indices, and the ViT on the first stage only);
    ``num_layers`` is the whole model's decoder depth (default: the layers ``model``
    holds, right for a whole model). Returns the names of the recomputed modules (empty
    for ``recompute = "none"``).
    """
    if cfg.recompute == "none":
        return []
    layers = decoder_layers(model)
    num_layers = len(layers) if num_layers is None else num_layers
    num_decoder = cfg.recompute_layers or num_layers
    if num_decoder > num_layers:
        raise ValueError(
            f"parallel.recompute_layers={cfg.recompute_layers} exceeds the model's {num_layers} decoder layers; "
            "use 0 (all) or a smaller count"
        )
    chosen: dict[str, nn.Module] = {f"layers.{i}": layer for i, layer in layers.items() if i < num_decoder}
    if hasattr(model, "vit"):
        chosen |= {f"vit.encoder.layers.{i}": layer for i, layer in enumerate(model.vit.encoder.layers)}
    for module in chosen.values():
        recompute_module(module)
    return list(chosen)
