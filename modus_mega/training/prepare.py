"""From a packed micro-batch to model inputs and loss targets, on the training device.

The frozen VAE encodes the 2D images here (on the accelerator, not in data workers),
the latents are cut into 2D tokens, noised at each split's flow time, and the positions
that carry a loss are gathered. Noise comes from the generator passed in, which the
loop seeds from (seed, step, micro-batch, rank) so a resumed run draws the same noise.

Shapes: T packed tokens, N_vae 2D tokens, P latent patch dim, I_vae images.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from modus_mega.config import ModelConfig
from modus_mega.data.documents import IGNORE_LABEL
from modus_mega.data.packing import PackedBatch
from modus_mega.encoders.vae import FluxAutoEncoder, patchify_latents
from modus_mega.flow import interpolate, velocity_target
from modus_mega.losses import LossTargets
from modus_mega.model.inputs import TOKEN_VAE, StepInputs


@torch.no_grad()
def encode_vae_tokens(batch: PackedBatch, vae: FluxAutoEncoder, cfg: ModelConfig, generator: torch.Generator) -> Tensor:
    """Clean 2D tokens x0 [N_vae, P] of every VAE split, in sequence order."""
    patch = cfg.latent_patch_size
    if batch.vae_images.shape[0] == 0:
        return batch.vae_images.new_zeros(0, cfg.patch_latent_dim)
    latents = vae.encode(batch.vae_images, generator=generator)  # [I_vae, C, H/8, W/8]
    tokens = [
        patchify_latents(latent[:, : rows * patch, : cols * patch], patch)
        for latent, (rows, cols) in zip(latents, batch.vae_grid.tolist())
    ]
    return torch.cat(tokens)


def prepare_step_inputs(batch: PackedBatch, vae: FluxAutoEncoder, cfg: ModelConfig, generator: torch.Generator) -> StepInputs:
    """Encode, noise and index one micro-batch (already on the training device)."""
    x0 = encode_vae_tokens(batch, vae, cfg, generator)  # [N_vae, P]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = batch.model.vae_timesteps.to(x0.dtype)
    vae_positions = torch.nonzero(batch.model.token_type == TOKEN_VAE, as_tuple=True)[0]
    if vae_positions.numel() != x0.shape[0]:
        raise ValueError(
            f"packed batch has {vae_positions.numel()} VAE tokens but its images encode to {x0.shape[0]}: "
            "the packer and the VAE geometry disagree (check model.vae and model.latent_patch_size)"
        )
    noisy = t > 0
    mse_index = vae_positions[noisy]
    ce_index = torch.nonzero(batch.ce_labels != IGNORE_LABEL, as_tuple=True)[0]
    return StepInputs(
        model=replace(batch.model, vae_tokens=interpolate(x0, noise, t), vae_timesteps=t),  # the packer's, 2D tokens made
        targets=LossTargets(
            ce_index=ce_index,
            ce_labels=batch.ce_labels[ce_index],
            ce_modality=batch.modality_ids[ce_index],
            mse_index=mse_index,
            velocity_target=velocity_target(x0, noise)[noisy],
            mse_modality=batch.modality_ids[mse_index],
        ),
    )
