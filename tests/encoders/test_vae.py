"""FluxAutoEncoder against diffusers' AutoencoderKL, plus the latent token layout.

Oracle: ``diffusers.AutoencoderKL`` configured like FLUX (no quant convs, one resolution
level per channel multiplier, ``layers_per_block = num_res_blocks``, mid-block attention,
32 norm groups). Its Downsample2D with padding 0 pads (0, 1, 0, 1) like FLUX. Layout
differences, handled by the key map below: diffusers lists decoder levels lowest
resolution first (``up_blocks.0`` = FLUX ``up.{L-1}``), and its mid attention uses
``nn.Linear`` q/k/v/out where FLUX uses 1x1 ``Conv2d`` (same weights, trailing 1x1
dims). Diffusers clamps the log-variance to [-30, 20]; random weights stay far inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from modus_mega.config import VAEConfig, load_config
from modus_mega.encoders.vae import (
    FluxAutoEncoder,
    latent_position_ids,
    patchify_latents,
    unpatchify_latents,
    vae_norm_groups,
)

ORACLE_VAE = VAEConfig(latent_channels=4, base_channels=32, channel_multipliers=[1, 2, 2], num_res_blocks=2)


def _flux_to_diffusers(name: str, num_levels: int) -> str:
    """Map one FLUX autoencoder key to the diffusers AutoencoderKL key holding the same tensor."""
    part, rest = name.split(".", 1)  # encoder | decoder
    fields = rest.split(".")
    if fields[0] in ("down", "up"):
        level = int(fields[1])
        if fields[0] == "down":
            prefix = f"down_blocks.{level}"
        else:
            prefix = f"up_blocks.{num_levels - 1 - level}"
        if fields[2] == "block":
            sub = ".".join(fields[4:]).replace("nin_shortcut", "conv_shortcut")
            return f"{part}.{prefix}.resnets.{fields[3]}.{sub}"
        sampler = {"downsample": "downsamplers.0", "upsample": "upsamplers.0"}[fields[2]]
        return f"{part}.{prefix}.{sampler}.{'.'.join(fields[3:])}"
    if fields[0] == "mid":
        tail = ".".join(fields[2:])
        if fields[1] in ("block_1", "block_2"):
            return f"{part}.mid_block.resnets.{int(fields[1][-1]) - 1}.{tail}"
        attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}[fields[2]]
        return f"{part}.mid_block.attentions.0.{attn}.{fields[3]}"
    return f"{part}.{rest.replace('norm_out', 'conv_norm_out')}"


def _oracle_pair() -> tuple[torch.nn.Module, FluxAutoEncoder]:
    diffusers = pytest.importorskip("diffusers")
    cfg = ORACLE_VAE
    levels = len(cfg.channel_multipliers)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[cfg.base_channels * m for m in cfg.channel_multipliers],
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.latent_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random norms and biases too, so any mix-up shows
        for p in ref.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5 * (0.5 if p.dim() > 1 else 0.2))
    ours = FluxAutoEncoder(cfg).eval()
    ref_state = ref.state_dict()
    state, used = {}, set()
    for name, tensor in ours.state_dict().items():
        ref_name = _flux_to_diffusers(name, levels)
        state[name] = ref_state[ref_name].reshape(tensor.shape)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        used.add(ref_name)
    assert used == set(ref_state), f"diffusers keys left unmapped: {sorted(set(ref_state) - used)}"
    ours.load_state_dict(state, strict=True)
    return ref, ours


def test_encoder_and_decoder_match_diffusers() -> None:
    ref, ours = _oracle_pair()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(images).latent_dist
        mean, logvar = ours.encoder(images).chunk(2, dim=1)
        torch.testing.assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar, posterior.logvar, rtol=1e-5, atol=1e-5)
        z = torch.randn(2, ORACLE_VAE.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours.decoder(z), ref.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_encode_decode_scale_shift_and_sampling() -> None:
    cfg = ORACLE_VAE
    torch.manual_seed(0)
    ae = FluxAutoEncoder(cfg).eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = ae.encoder(images).chunk(2, dim=1)
        latents = ae.encode(images, sample=False)
        torch.testing.assert_close(latents, cfg.scale_factor * (mean - cfg.shift_factor))

        sampled = ae.encode(images, generator=torch.Generator().manual_seed(7))  # cfg.sample_posterior is True
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        z = mean + torch.exp(0.5 * logvar) * eps
        torch.testing.assert_close(sampled, cfg.scale_factor * (z - cfg.shift_factor))
        assert not torch.allclose(sampled, latents)

        torch.testing.assert_close(ae.decode(latents), ae.decoder(mean), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))


def test_flux_key_names() -> None:
    keys = set(FluxAutoEncoder(ORACLE_VAE).state_dict())
    for name in (
        "encoder.conv_in.weight",
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.downsample.conv.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.norm_out.weight",
        "decoder.mid.block_2.norm1.bias",
        "decoder.up.2.block.2.conv1.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.conv_out.bias",
    ):
        assert name in keys, name
    assert not any(k.startswith(("encoder.down.2.downsample", "decoder.up.0.upsample")) for k in keys)


def test_latent_patchify_layout_and_round_trip() -> None:
    einops = pytest.importorskip("einops")
    latent = torch.randn(16, 6, 4)
    tokens = patchify_latents(latent, 2)
    assert tokens.shape == (6, 64)
    reference = einops.rearrange(latent, "c (h p) (w q) -> (h w) (p q c)", p=2, q=2)
    torch.testing.assert_close(tokens, reference, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify_latents(tokens, 3, 2, 2, 16), latent, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not form"):
        unpatchify_latents(tokens, 2, 2, 2, 16)
    with pytest.raises(ValueError, match="latent_patch_size"):
        patchify_latents(torch.zeros(16, 5, 4), 2)


def test_latent_position_ids() -> None:
    assert latent_position_ids(2, 3, 4).tolist() == [0, 1, 2, 4, 5, 6]
    with pytest.raises(ValueError, match="max_latent_size"):
        latent_position_ids(1, 5, 4)


def test_tiny_config_builds_and_runs() -> None:
    cfg = load_config("configs/tiny.json").model.vae
    assert vae_norm_groups(cfg) == 8  # gcd(32, base_channels=8) until VAEConfig carries norm_groups
    assert vae_norm_groups(VAEConfig()) == 32  # FLUX
    ae = FluxAutoEncoder(cfg).eval()
    with torch.no_grad():
        latents = ae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
        assert latents.shape == (2, cfg.latent_channels, 8, 8)
        assert ae.decode(latents).shape == (2, 3, 64, 64)
        # A rank with no VAE images still runs the encoder (DESIGN §6).
        assert ae.encode(torch.zeros(0, 3, 64, 64)).shape == (0, cfg.latent_channels, 8, 8)


def test_explicit_norm_groups_field_is_used_and_checked() -> None:
    @dataclass
    class VAEConfigWithGroups(VAEConfig):
        norm_groups: int = 4

    ae = FluxAutoEncoder(VAEConfigWithGroups(base_channels=8, channel_multipliers=[1, 2]))
    assert ae.encoder.norm_out.num_groups == 4
    with pytest.raises(ValueError, match="must divide every autoencoder width"):
        FluxAutoEncoder(VAEConfigWithGroups(base_channels=8, channel_multipliers=[1, 2], norm_groups=3))
