"""SiglipNaViT against Hugging Face's SiglipVisionModel, plus NaViT packing isolation.

Oracle: ``transformers.SiglipVisionModel`` with a tiny random config whose position
table is S*S (S = image_size / patch_size) and whose layer count equals
``num_layers_used``; on one image of exactly S x S patches its fixed position ids
0..S*S-1 equal our ``row * S + col``. Weights are copied by name, the Conv2d patch
embedding converted with ``conv_patch_weight_to_linear``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modus_mega.config import ViTConfig, load_config
from modus_mega.encoders.vit import (
    HAVE_FLASH_ATTN,
    SiglipNaViT,
    conv_patch_weight_to_linear,
    patchify_image,
    vit_position_ids,
)

TINY_VIT = ViTConfig(
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    num_layers=3,
    select_layer=-2,
    patch_size=8,
    max_patches_per_side=4,
    layer_norm_eps=1e-6,
    num_channels=3,
)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter (LayerNorm affine included) random values so mix-ups show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _packed(images: list[torch.Tensor], cfg: ViTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    patches, pos, lengths = [], [], [0]
    for img in images:
        h, w = img.shape[1] // cfg.patch_size, img.shape[2] // cfg.patch_size
        patches.append(patchify_image(img, cfg.patch_size))
        pos.append(vit_position_ids(h, w, cfg.max_patches_per_side))
        lengths.append(lengths[-1] + h * w)
    return torch.cat(patches), torch.cat(pos), torch.tensor(lengths, dtype=torch.int32)


def test_matches_hf_siglip_vision_model() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = TINY_VIT
    side = cfg.max_patches_per_side
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers_used,
        num_attention_heads=cfg.num_heads,
        num_channels=cfg.num_channels,
        image_size=side * cfg.patch_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=cfg.layer_norm_eps,
        vision_use_head=False,
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.SiglipVisionModel(hf_cfg).eval()
    _randomize(hf, seed=0)

    ours = SiglipNaViT(cfg).eval()
    state = {}
    for key, value in hf.state_dict().items():
        name = key.removeprefix("vision_model.")  # transformers < 5 nests the tower under vision_model
        if name == "embeddings.patch_embedding.weight":
            value = conv_patch_weight_to_linear(value)
        state[name] = value
    ours.load_state_dict(state, strict=True)  # every name must match one-to-one

    image = torch.randn(cfg.num_channels, side * cfg.patch_size, side * cfg.patch_size)
    with torch.no_grad():
        expected = hf(pixel_values=image[None]).last_hidden_state[0]  # [S*S, D]
        patches, pos, cu = _packed([image], cfg)
        got = ours(patches, pos, cu)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_images_are_isolated() -> None:
    cfg = load_config("configs/tiny.json").model.vit
    torch.manual_seed(0)
    model = SiglipNaViT(cfg).eval()
    _randomize(model, seed=1)
    p = cfg.patch_size
    images = [torch.randn(3, 3 * p, 4 * p), torch.randn(3, 2 * p, 2 * p), torch.randn(3, 5 * p, 1 * p)]
    with torch.no_grad():
        packed = model(*_packed(images, cfg))
        alone = torch.cat([model(*_packed([img], cfg)) for img in images])
        # Control: one joint attention over the same tokens must differ, else the test proves nothing.
        patches, pos, _ = _packed(images, cfg)
        joint = model(patches, pos, torch.tensor([0, patches.shape[0]], dtype=torch.int32))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (joint - alone).abs().max() > 1e-3


def test_patchify_order_matches_conv_patch_embedding() -> None:
    torch.manual_seed(0)
    channels, p = 3, 4
    image = torch.randn(channels, 3 * p, 2 * p)
    patches = patchify_image(image, p)
    # Explicit reference: patch (i, j) is image[:, i*p:(i+1)*p, j*p:(j+1)*p] flattened (row, col, channel).
    ref = torch.stack(
        [
            image[:, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(1, 2, 0).reshape(-1)
            for i in range(3)
            for j in range(2)
        ]
    )
    torch.testing.assert_close(patches, ref, rtol=0, atol=0)
    # A Conv2d patch embedding and its linear conversion agree on every patch.
    weight, bias = torch.randn(5, channels, p, p), torch.randn(5)
    conv = F.conv2d(image[None], weight, bias, stride=p)[0]  # [5, 3, 2]
    linear = patches @ conv_patch_weight_to_linear(weight).T + bias  # [6, 5]
    torch.testing.assert_close(linear, conv.flatten(1).T, rtol=1e-5, atol=1e-5)


def test_position_ids_and_input_errors() -> None:
    assert vit_position_ids(2, 3, 5).tolist() == [0, 1, 2, 5, 6, 7]
    with pytest.raises(ValueError, match="position table"):
        vit_position_ids(6, 1, 5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patchify_image(torch.zeros(3, 10, 8), 4)
    model = SiglipNaViT(TINY_VIT)
    patches, pos, _ = _packed([torch.zeros(3, 16, 16)], TINY_VIT)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(patches, pos, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="patchify_image"):
        model(patches[:, :-1], pos, torch.tensor([0, 4], dtype=torch.int32))


def test_layers_built_and_key_names() -> None:
    model = SiglipNaViT(TINY_VIT)
    assert len(model.encoder.layers) == TINY_VIT.num_layers_used == 2
    keys = set(model.state_dict())
    for name in (
        "embeddings.patch_embedding.weight",
        "embeddings.position_embedding.weight",
        "encoder.layers.1.layer_norm1.weight",
        "encoder.layers.1.self_attn.q_proj.bias",
        "encoder.layers.1.self_attn.out_proj.weight",
        "encoder.layers.1.mlp.fc2.weight",
        "post_layernorm.bias",
    ):
        assert name in keys, name
    assert model.embeddings.position_embedding.weight.shape == (16, 32)
    assert model.embeddings.patch_embedding.weight.shape == (32, 8 * 8 * 3)


def test_empty_input_runs_and_backpropagates() -> None:
    """A rank with no ViT tokens still runs the tower (DESIGN §6) and gets zero gradients."""
    model = SiglipNaViT(TINY_VIT)
    patches = torch.zeros(0, 8 * 8 * 3)
    out = model(patches, torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, TINY_VIT.hidden_size)
    out.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"


@pytest.mark.skipif(not (HAVE_FLASH_ATTN and torch.cuda.is_available()), reason="needs CUDA and flash-attn")
def test_flash_attn_path_matches_sdpa_path() -> None:
    import modus_mega.encoders.vit as vit

    cfg = load_config("configs/tiny.json").model.vit
    model = SiglipNaViT(cfg).cuda().to(torch.bfloat16).eval()
    p = cfg.patch_size
    images = [torch.randn(3, 3 * p, 4 * p), torch.randn(3, 2 * p, 2 * p)]
    patches, pos, cu = _packed(images, cfg)
    args = (patches.cuda().to(torch.bfloat16), pos.cuda(), cu.cuda())
    with torch.no_grad():
        flash = model(*args).float()
        vit.HAVE_FLASH_ATTN = False
        try:
            sdpa = model(*args).float()
        finally:
            vit.HAVE_FLASH_ATTN = True
    torch.testing.assert_close(flash, sdpa, rtol=5e-2, atol=5e-2)
