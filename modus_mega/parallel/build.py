"""Model construction for any layout: ONE ordered list of steps, used at pp = 1 and at pp > 1 (STYLE 1, 3, 16).

``build_model`` runs, in this order:

1. build: the whole ``ModusModel`` with this layout's linear layers (``select_linears``) and
   the run's attention backend (chosen here, once) on
   the device (pp = 1), or this rank's pipeline stage of it, built on the meta device and
   then allocated (pp > 1, ``parallel/pipeline.py``);
2. tensor-parallel linears: the gradient hooks of the replicated weights that see partial
   sums (``apply_tensor_parallel``; the sharded linears themselves came from step 1);
3. FP8 (``training.precision = "fp8"``): the MoT linears compute in FP8 (``apply_float8``,
   ``parallel/fp8.py``): after the linears exist and are sharded (a tensorwise scale reduces
   its amax over the tp group), before initialisation, which fills the same parameters by
   name (the linears are re-classed in place, so names and parameters do not change);
4. initialise every parameter by its global name (``model/init.py``), so the full weights
   do not depend on the layout;
5. freeze (``model.llm.freeze_1d_expert``);
6. activation recomputation (``parallel/recompute.py``), which wraps the forward of the
   layers that exist by now;
7. [compile: goes here, last, over the finished modules].

Every step after the first takes the module this rank trains: the whole model, or its
stage. Steps 2 to 6 draw no random numbers from the global generator (step 4 seeds
its own per name), so their order is free of RNG effects; step 1 builds the same modules
in the same order on every path. Starting from BAGEL (``convert/run_init.py``) and
``deepspeed.initialize`` follow, in ``training/engine.py``.
"""

from __future__ import annotations

from torch import nn

from modus_mega.config import ModusConfig
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.losses import MicroBatchLoss
from modus_mega.model.init import init_weights, seeded_vae
from modus_mega.model.layers import LinearFactory
from modus_mega.model.modus import ModusModel, decoder_layers
from modus_mega.ops.attention import get_attention_backend
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.fp8 import apply_float8
from modus_mega.parallel.pipeline import ModusPipeline, build_pipeline
from modus_mega.parallel.recompute import apply_activation_checkpointing
from modus_mega.parallel.te import build_te_linears
from modus_mega.parallel.tensor_parallel import apply_tensor_parallel, build_linears, init_hooks


def build_model(cfg: ModusConfig, ctx: ParallelContext, loss_fn: MicroBatchLoss | None = None) -> ModusModel | ModusPipeline:
    """This rank's trainable model for ``cfg``'s layout, initialised from ``training.seed`` (see the module docstring).

    pp = 1: the ``ModusModel`` (this rank's tp shard). pp > 1: the ``ModusPipeline`` holding
    this rank's stage, whose last stage runs ``loss_fn`` on each micro-batch.
    """
    linears = select_linears(cfg, ctx)
    attention = get_attention_backend(cfg.model.attention_backend, ctx.device)  # once per run, kept by the model
    if ctx.pp > 1:
        model = build_pipeline(cfg, ctx, linears, attention, loss_fn)
    else:
        model = ModusModel(cfg.model, linears, attention).to(ctx.device)
    trained = trained_module(model)
    apply_tensor_parallel(trained, ctx)
    apply_float8(trained, cfg.training, ctx)
    zero_init = ("llm2vae",) if cfg.model.zero_init_llm2vae else ()
    init_weights(trained, cfg.training.seed, cfg.model.llm.init_std, zero_init=zero_init, **init_hooks(ctx))
    if cfg.model.llm.freeze_1d_expert:
        for layer in decoder_layers(trained).values():
            layer.experts[0].requires_grad_(False)
    apply_activation_checkpointing(trained, cfg.parallel, num_layers=cfg.model.llm.num_layers)
    # torch.compile slots in here, last.
    return model


def trained_module(model: ModusModel | ModusPipeline) -> nn.Module:
    """The module whose parameters this rank holds under the model's global names: the model, or its stage."""
    return model.stage if isinstance(model, ModusPipeline) else model


def select_linears(cfg: ModusConfig, ctx: ParallelContext) -> LinearFactory:
    """The linear layers of ``parallel.tp_backend`` for this layout."""
    if cfg.parallel.tp_backend == "te":
        return build_te_linears(ctx, cfg.model.llm)
    return build_linears(ctx, cfg.model.llm)


def build_vae(cfg: ModusConfig, ctx: ParallelContext) -> FluxAutoEncoder:
    """The frozen VAE on this rank's device, initialised from ``training.seed``."""
    return seeded_vae(cfg).to(ctx.device)
