"""Layout-invariant weight initialisation: build, shard, then initialise (STYLE 3).

Every parameter is drawn in FULL from a generator seeded by (seed, its name), then the
local shard is cut out of it. Names do not depend on the parallel layout (layer indices
are global), so one seed gives the same full weights at any tp / pp degree.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from modus_mega.config import ModusConfig
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.embeddings import SinCos2DPositionEmbedding
from modus_mega.model.layers import RMSNorm
from modus_mega.seeding import derive_seed

# (parameter, its full tensor) -> the slice this rank holds. Serial: the full tensor itself.
ShardFn = Callable[[nn.Parameter, Tensor], Tensor]
# parameter -> its full (unsharded) shape. Serial: the parameter's own shape.
FullShapeFn = Callable[[nn.Parameter], torch.Size]

_NORMS = (RMSNorm, nn.LayerNorm, nn.GroupNorm)


@torch.no_grad()
def init_weights(
    model: nn.Module,
    seed: int,
    std: float,
    zero_init: tuple[str, ...] = (),
    full_shape: FullShapeFn = lambda p: p.shape,
    shard: ShardFn = lambda p, full: full,
    prefix: str = "",
) -> None:
    """Initialise ``model`` in place.

    Norm weights are one, biases zero, fixed sin-cos tables recomputed, parameters under a
    module named in ``zero_init`` (e.g. ``llm2vae``) zero, and every other weight
    N(0, std^2). ``prefix`` is prepended to names (a pipeline stage passes the global
    name of its first module).
    """
    for module_name, module in model.named_modules():
        if isinstance(module, SinCos2DPositionEmbedding):
            module.reset_parameters()
            continue
        zeroed = any(part in zero_init for part in module_name.split("."))
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{prefix}{module_name}.{param_name}" if module_name else f"{prefix}{param_name}"
            shape = full_shape(param)
            if zeroed or param_name == "bias":
                full = torch.zeros(shape)
            elif isinstance(module, _NORMS):
                full = torch.ones(shape)
            else:
                generator = torch.Generator().manual_seed(derive_seed(seed, name))
                full = torch.empty(shape).normal_(0.0, std, generator=generator)
            param.copy_(shard(param, full))


def seeded_vae(cfg: ModusConfig) -> FluxAutoEncoder:
    """The frozen VAE of a run started from the seeded init (no BAGEL release), on the CPU.

    Training builds it from ``training.seed`` and never updates it, so evaluating such a run
    rebuilds it here instead of reading it from the checkpoint (which holds no VAE).
    """
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, cfg.training.seed, cfg.model.llm.init_std, prefix="vae.")
    return vae.requires_grad_(False).eval()
