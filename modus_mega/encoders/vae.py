"""The FLUX autoencoder (frozen in MODUS) and the latent <-> 2D-token layout.

Structure and parameter names follow FLUX's ``AutoEncoder`` (BAGEL's
``modeling/autoencoder.py``), so ``ae.safetensors`` loads by name:
``encoder.conv_in``, ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``,
``encoder.down.{i}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``
(``attn_1.{norm,q,k,v,proj_out}``, 1x1 convs), ``encoder.norm_out``, ``encoder.conv_out``,
and the decoder mirror with ``decoder.up.{i}.block.{j}`` / ``decoder.up.{i}.upsample.conv``
(``up.{i}`` is resolution level i, the highest resolution being level 0).

Details that matter for numerical equality with FLUX: downsampling pads (0, 1, 0, 1)
(right and bottom only) and then runs a stride-2 3x3 conv without padding; upsampling
is nearest x2 then a 3x3 conv; the mid attention is single-head over all positions with
scale 1/sqrt(C); the posterior log-variance is not clamped.

Shape legend: B batch, C channels, H x W pixels, h x w latent cells (H/d, W/d with
d = ``cfg.downsample``), Z latent channels.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modus_mega.config import VAEConfig

def vae_norm_groups(cfg: VAEConfig) -> int:
    """The GroupNorm group count of every autoencoder norm, checked against every width.

    FLUX uses 32; the tiny config, whose widths are multiples of 8, uses 8.
    """
    groups = cfg.norm_groups
    widths = sorted({cfg.base_channels * m for m in cfg.channel_multipliers})
    bad = [c for c in widths if c % groups]
    if groups < 1 or bad:
        raise ValueError(
            f"model.vae norm groups {groups} must divide every autoencoder width {widths} "
            f"(base_channels * channel_multipliers; {bad} do not); pick a divisor of base_channels"
        )
    return groups


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, h, w] -> [B, 1, h*w, C]: one head whose width is all channels.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # [B, 1, h*w, C]
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Halve h and w: pad right and bottom by one, then a stride-2 3x3 conv (FLUX's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double h and w: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """block_1, attn_1, block_2 at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution level: residual blocks, then (except the last level) a downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups) for j in range(num_blocks))
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: residual blocks, then (except level 0) an upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups) for j in range(num_blocks))
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """Images [B, C_in, H, W] -> posterior moments [B, 2Z, h, w] (mean, then log-variance)."""

    def __init__(self, cfg: VAEConfig, groups: int) -> None:
        super().__init__()
        ch, mults = cfg.base_channels, cfg.channel_multipliers
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, kernel_size=3, padding=1)
        in_mults = [1] + list(mults[:-1])
        self.down = nn.ModuleList(
            DownLevel(ch * in_mults[i], ch * mults[i], cfg.num_res_blocks, groups, downsample=i < len(mults) - 1)
            for i in range(len(mults))
        )
        top = ch * mults[-1]
        self.mid = MidBlock(top, groups)
        self.norm_out = _group_norm(top, groups)
        self.conv_out = nn.Conv2d(top, 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """z [B, Z, h, w] (unscaled) -> images [B, C_in, H, W]."""

    def __init__(self, cfg: VAEConfig, groups: int) -> None:
        super().__init__()
        ch, mults = cfg.base_channels, cfg.channel_multipliers
        top = ch * mults[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, top, kernel_size=3, padding=1)
        self.mid = MidBlock(top, groups)
        # Level i reads the width of level i + 1 (or the mid width at the top) and writes ch * mults[i].
        in_widths = [ch * m for m in mults[1:]] + [top]
        self.up = nn.ModuleList(
            UpLevel(in_widths[i], ch * mults[i], cfg.num_res_blocks + 1, groups, upsample=i > 0)
            for i in range(len(mults))
        )
        self.norm_out = _group_norm(ch * mults[0], groups)
        self.conv_out = nn.Conv2d(ch * mults[0], cfg.in_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class FluxAutoEncoder(nn.Module):
    """FLUX's KL autoencoder: ``encode`` images to scaled latents, ``decode`` them back.

    Latents are ``scale_factor * (z - shift_factor)`` where z is the posterior mean or a
    sample ``mean + exp(logvar / 2) * eps``; the 2D expert sees these scaled latents.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        groups = vae_norm_groups(cfg)
        self.downsample = cfg.downsample
        self.scale_factor = cfg.scale_factor
        self.shift_factor = cfg.shift_factor
        self.sample_posterior = cfg.sample_posterior
        self.encoder = Encoder(cfg, groups)
        self.decoder = Decoder(cfg, groups)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool | None = None) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> scaled latents [B, Z, H/d, W/d].

        ``sample`` (default ``cfg.sample_posterior``) draws z from the posterior with
        ``generator`` (on the images' device) instead of taking its mean.
        """
        if images.dim() != 4 or images.shape[-2] % self.downsample or images.shape[-1] % self.downsample:
            raise ValueError(
                f"images must be [B, C, H, W] with H and W multiples of {self.downsample}, "
                f"got {tuple(images.shape)}; resize or crop first"
            )
        mean, logvar = self.encoder(images).chunk(2, dim=1)  # [B, Z, h, w] each
        z = mean
        if self.sample_posterior if sample is None else sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, Z, h, w] -> images [B, C, h*d, w*d] (roughly in [-1, 1])."""
        return self.decoder(latents / self.scale_factor + self.shift_factor)


def patchify_latents(latent: Tensor, patch_size: int) -> Tensor:
    """One latent [C, H, W] -> 2D tokens [(H/p)*(W/p), p*p*C], i.e. ``c (h p) (w q) -> (h w) (p q c)``."""
    if latent.dim() != 3:
        raise ValueError(f"patchify_latents expects one latent [C, H, W], got shape {tuple(latent.shape)}")
    channels, height, width = latent.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"latent size {height}x{width} is not a multiple of latent_patch_size={patch_size}; "
            "use images whose side is a multiple of the VAE downsampling times latent_patch_size"
        )
    h, w = height // patch_size, width // patch_size
    tokens = latent.reshape(channels, h, patch_size, w, patch_size).permute(1, 3, 2, 4, 0)  # [h, w, p, q, C]
    return tokens.reshape(h * w, patch_size * patch_size * channels)


def unpatchify_latents(tokens: Tensor, h: int, w: int, patch_size: int, channels: int) -> Tensor:
    """Inverse of ``patchify_latents``: tokens [h*w, p*p*C] -> latent [C, h*p, w*p]."""
    expected = (h * w, patch_size * patch_size * channels)
    if tuple(tokens.shape) != expected:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not form a {h}x{w} grid of {patch_size}x{patch_size}x{channels} "
            f"patches; expected {expected}"
        )
    latent = tokens.reshape(h, w, patch_size, patch_size, channels).permute(4, 0, 2, 1, 3)  # [C, h, p, w, q]
    return latent.reshape(channels, h * patch_size, w * patch_size)


def latent_position_ids(h: int, w: int, max_latent_size: int) -> Tensor:
    """Indices [h*w] into the latent position table for an h x w token grid: ``row * max_latent_size + col``."""
    if not (1 <= h <= max_latent_size and 1 <= w <= max_latent_size):
        raise ValueError(
            f"latent token grid {h}x{w} does not fit the {max_latent_size}x{max_latent_size} position table; "
            "use smaller images or raise model.max_latent_size"
        )
    rows = torch.arange(h, dtype=torch.long)
    cols = torch.arange(w, dtype=torch.long)
    return (rows[:, None] * max_latent_size + cols[None, :]).reshape(-1)
