"""The precision seam: the compute dtype, and FP8 for the MoT linears (``training.precision``).

``training.precision``: ``auto`` (bf16 on GPU, fp32 on CPU, the behaviour before this option),
``fp32``, ``bf16``, or ``fp8`` (bf16, with the q/k/v/o and MLP linears of both experts
multiplying in FP8; the embedding, LM head, vae2llm/llm2vae, ViT and VAE stay bf16). Master
weights, gradients and optimizer states are never FP8, and FP8 adds no parameter or state-dict
key, so a checkpoint resumes in any precision.

Two FP8 backends, chosen by the linears the model was built with (``parallel.tp_backend``):

- ``local`` (plain ``nn.Linear`` at tp = 1, Megatron-core's parallel linears above): torchao's
  float8 casts and matmuls, dynamic scaling, applied by ``apply_float8``, which re-classes the
  linears in place (``parallel/fp8_torchao.py``). Runs on CPU too.
- ``te``: Transformer Engine's linears under ``float8_autocast`` (``parallel/fp8_te.py``).

Order of model construction: build (with the layout's linears), tensor parallelism,
``apply_float8``, initialisation, recomputation. FP8 changes only the linears' forward, so its
place among the steps after the build does not matter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from modus_mega.config import TrainingConfig
from modus_mega.model.mot import MoTExpert
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.fp8_te import te_fp8_autocast
from modus_mega.parallel.fp8_torchao import FLOAT8_CLASSES, to_float8

# The linears of one expert that compute in FP8, by their names under the expert.
FLOAT8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of activations and of the weights the model computes with, for ``training.precision``.

    FP8 computes everything but the MoT linears' matmuls in bf16. Raises ``ValueError`` for an
    unknown precision.
    """
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"training.precision={precision!r} is not one of ['auto', 'fp32', 'bf16', 'fp8']")
    return dtypes[precision]


def apply_float8(model: nn.Module, cfg: TrainingConfig, ctx: ParallelContext) -> list[str]:
    """Make the MoT linears of ``model`` compute in FP8 when ``cfg.precision == "fp8"``; their names.

    torchao linears (``parallel.tp_backend = "local"``) are converted in place, keeping every
    module, parameter and state-dict key; Transformer Engine linears are left as they are (they
    compute in FP8 under ``float8_autocast``) and named all the same. Returns [] for any other
    precision.
    """
    if cfg.precision != "fp8":
        return []
    names = []
    for prefix, expert in model.named_modules():
        if not isinstance(expert, MoTExpert):
            continue
        for name in FLOAT8_LINEARS:
            linear = expert.get_submodule(name)
            if type(linear) in FLOAT8_CLASSES:
                to_float8(linear, cfg.fp8, ctx.tp_group)
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


def float8_autocast(cfg: TrainingConfig, tp_backend: str, ctx: ParallelContext) -> AbstractContextManager:
    """The context each forward runs in: TE's FP8 autocast for ``fp8`` on the ``te`` backend, else nothing."""
    if cfg.precision == "fp8" and tp_backend == "te":
        return te_fp8_autocast(cfg.fp8, ctx.tp_group)
    return nullcontext()
