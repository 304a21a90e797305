"""The frozen pretrained vision encoders: the SigLIP NaViT tower and the FLUX autoencoder."""

from modus_mega.encoders.vae import (
    FluxAutoEncoder,
    latent_position_ids,
    patchify_latents,
    unpatchify_latents,
    vae_norm_groups,
)
from modus_mega.encoders.vit import (
    HAVE_FLASH_ATTN,
    SiglipNaViT,
    conv_patch_weight_to_linear,
    patchify_image,
    vit_position_ids,
)

__all__ = [
    "HAVE_FLASH_ATTN",
    "FluxAutoEncoder",
    "SiglipNaViT",
    "conv_patch_weight_to_linear",
    "latent_position_ids",
    "patchify_image",
    "patchify_latents",
    "unpatchify_latents",
    "vae_norm_groups",
    "vit_position_ids",
]
