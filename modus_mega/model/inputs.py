"""What the model consumes for one packed micro-batch.

T tokens in the packed sequence; N_vit ViT patches and N_vae 2D tokens among them, in
sequence order. Token types decide the input embedding and the expert: TEXT and VIT
tokens (text, start markers, <vision_start>/<vision_end>, ViT patches) go to the 1D
expert, VAE tokens (clean or noisy latent patches) to the 2D expert (BAGEL's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

TOKEN_TEXT, TOKEN_VIT, TOKEN_VAE = 0, 1, 2


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
        moved = {}
        for f in fields(self):
            t = getattr(self, f.name)
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            moved[f.name] = t.to(device=device, dtype=cast, non_blocking=True)
        return ModelInputs(**moved)

    def in_compute_dtype(self, dtype: torch.dtype) -> "ModelInputs":
        """A copy whose pixel and latent inputs (ViT patches, 2D tokens) are in ``dtype``; ``self`` is unchanged.

        Flow times stay fp32 (the timestep embedding computes its frequencies in fp32), and
        integer metadata is not touched. The one place the training step casts its inputs.
        """
        return replace(self, vit_patches=self.vit_patches.to(dtype), vae_tokens=self.vae_tokens.to(dtype))


@dataclass
class StepInputs:
    """Everything one forward + loss needs: the model's inputs and the loss positions and targets."""

    model: ModelInputs
    ce_index: Tensor  # [N_ce] long, ascending: positions whose next token is a 1D target token
    ce_labels: Tensor  # [N_ce] long
    ce_modality: Tensor  # [N_ce] long
    mse_index: Tensor  # [N_mse] long, ascending: positions of noisy 2D tokens
    velocity_target: Tensor  # [N_mse, P]
    mse_modality: Tensor  # [N_mse] long
