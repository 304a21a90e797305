"""Start a fresh training run from a BAGEL release (``init.bagel_dir``), at any tp x pp layout.

A resumed run reads only the release's VAE: it is frozen, so the checkpoint does not hold it.

``build_engine`` (``training/engine.py``, which builds a run) calls ``init_from_bagel`` after
the seeded init and before DeepSpeed wraps the model (ZeRO copies the weights into its own
partitions there). Each rank reads
only what it holds: its pipeline stage's tensors (stage parameters carry the model's
global names, ``parallel/pipeline.py``), and of those only its tensor-parallel slices: a
column-parallel weight's rows, a row-parallel weight's columns (safetensors slices read
just those bytes). Replicated tensors and the VAE (``ae.safetensors``, small, on every
rank) are read whole. The vocabulary tensors are read whole (BAGEL's rows plus the
appended new rows, ``source.extend_vocab_rows``) and then sliced, so every layout gets the
same full table.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from modus_mega.checkpoint_layout import resumes_from_checkpoint
from modus_mega.config import ModusConfig
from modus_mega.convert.bagel import load_bagel_into, load_bagel_vae
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.pipeline import ModusPipeline
from modus_mega.parallel.tensor_parallel import init_hooks


def init_from_bagel(
    model: ModusModel | ModusPipeline, vae: FluxAutoEncoder, cfg: ModusConfig, ctx: ParallelContext
) -> bool:
    """Load ``cfg.init.bagel_dir`` into this rank's part of ``model`` and into ``vae``; True when it did.

    ``model`` is this rank's tp shard (pp = 1) or its pipeline (pp > 1: its stage is
    loaded, the release's other tensors are skipped). Nothing is read when
    ``init.bagel_dir`` is empty. A run that resumes from its own checkpoint reads only the
    VAE: the checkpoint replaces the trained weights, but the frozen VAE is not in it. The
    model config is checked against the release first (``release.check_bagel_config``: every
    mismatch at once); the new vocabulary rows are drawn from ``init.seed``. Every tensor this
    rank holds is overwritten.
    """
    if not cfg.init.bagel_dir:
        return False
    if resumes_from_checkpoint(cfg):
        load_bagel_vae(vae, Path(cfg.init.bagel_dir))
        return False
    target: nn.Module = model.stage if isinstance(model, ModusPipeline) else model
    load_bagel_into(
        target, vae, Path(cfg.init.bagel_dir), cfg.model, seed=cfg.init.seed,
        **init_hooks(ctx),
        allow_unused=isinstance(model, ModusPipeline), progress=ctx.is_main,
    )  # fmt: skip
    return True
