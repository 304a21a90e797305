"""What the model consumes for one packed micro-batch.

T tokens in the packed sequence; N_vit ViT patches and N_vae 2D tokens among them, in
sequence order. Token types decide the input embedding and the expert: TEXT and VIT
tokens (text, start markers, <vision_start>/<vision_end>, ViT patches) go to the 1D
expert, VAE tokens (clean or noisy latent patches) to the 2D expert (BAGEL's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
