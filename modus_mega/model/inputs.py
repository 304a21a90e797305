"""What the model consumes for one packed micro-batch.

T tokens in the packed sequence; N_vit ViT patches and N_vae 2D tokens among them, in
sequence order. Token types decide the input embedding and the expert: TEXT and VIT
tokens (text, start markers, <vision_start>/<vision_end>, ViT patches) go to the 1D
expert, VAE tokens (clean or noisy latent patches) to the 2D expert (BAGEL's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from modus_mega.losses import LossTargets

TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE = 0, 1, 2

R = TypeVar("R")


def record_tensors(record: Any) -> tuple[Tensor, ...]:
    """Every field of a tensor record (a dataclass of tensors) in declaration order: how a record
    travels where only tuples of tensors may (DeepSpeed's pipeline loads them on its stages)."""
    return tuple(getattr(record, f.name) for f in fields(record))


def record_from_tensors(cls: type[R], tensors: tuple[Tensor, ...] | list[Tensor]) -> R:
    """The record of type ``cls`` whose ``record_tensors`` are ``tensors`` (the inverse)."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if len(tensors) != len(names):
        raise ValueError(f"{len(tensors)} tensors for {cls.__name__}'s {len(names)} fields {names}")
    return cls(**dict(zip(names, tensors)))


def map_tensors(record: R, fn: Callable[[Tensor], Tensor]) -> R:
    """A copy of the dataclass ``record`` with ``fn`` applied to each tensor field (other fields kept)."""
    tensors = {f.name: v for f in fields(record) if isinstance(v := getattr(record, f.name), Tensor)}  # type: ignore[arg-type]
    return replace(record, **{name: fn(v) for name, v in tensors.items()})  # type: ignore[type-var]


def expert_ids_of(token_type: Tensor) -> Tensor:
    """Expert index per token [T]: 1 (2D expert) for VAE tokens, 0 (1D expert) otherwise."""
    return (token_type == TOKEN_VAE).long()


@dataclass
class ModelInputs:
    """One packed micro-batch as the model sees it (2D tokens already noised)."""

    input_ids: Tensor  # [T] long: vocabulary id of TEXT tokens, 0 elsewhere
    token_type: Tensor  # [T] long: TOKEN_TEXT / TOKEN_VIT / TOKEN_VAE
    position_ids: Tensor  # [T] long: RoPE positions (restart per sample; one per image split)
    attn_lo: Tensor  # [T] int32: key k is visible to query rows [lo_k, hi_k) (DESIGN §4)
    attn_hi: Tensor  # [T] int32
    vit_patches: Tensor  # [N_vit, p*p*C] float: flattened (patch row, patch col, channel)
    vit_position_ids: Tensor  # [N_vit] long: row * S + col in the ViT position table
    vit_cu_seqlens: Tensor  # [num_vit_images + 1] int32: image boundaries among the patches
    vae_tokens: Tensor  # [N_vae, latent_patch_dim] float: x_t = (1 - t) x0 + t eps
    vae_timesteps: Tensor  # [N_vae] float: flow time t of each 2D token (0 for clean ones)
    vae_position_ids: Tensor  # [N_vae] long: row * max_latent_size + col

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Move every tensor to ``device``; float tensors are cast to ``dtype`` if given."""

        def move(t: Tensor) -> Tensor:
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            return t.to(device=device, dtype=cast, non_blocking=True)

        return map_tensors(self, move)

    def in_compute_dtype(self, dtype: torch.dtype) -> "ModelInputs":
        """A copy whose pixel and latent inputs (ViT patches, 2D tokens) are in ``dtype``; ``self`` is unchanged.

        Flow times stay fp32 (the timestep embedding computes its frequencies in fp32), and
        integer metadata is not touched. The one place the training step casts its inputs.
        """
        return replace(self, vit_patches=self.vit_patches.to(dtype), vae_tokens=self.vae_tokens.to(dtype))


@dataclass
class StepInputs:
    """One micro-batch of a training step: the model's inputs and the loss's targets (``training/prepare.py``)."""

    model: ModelInputs
    targets: LossTargets


def target_counts(micro_batches: list[StepInputs]) -> list[int]:
    """[N_ce, N_mse] summed over ``micro_batches``: this rank's share of a batch's target counts."""
    return [sum(m.targets.counts[i] for m in micro_batches) for i in (0, 1)]
