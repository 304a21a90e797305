"""The SigLIP (so400m/14) vision tower, NaViT style, as BAGEL runs it.

Images of any size (multiples of the patch size) are cut into patches, flattened
(patch row, patch col, channel) and packed into one token sequence; ``cu_seqlens``
marks where each image starts. Attention never crosses an image boundary and there is
no RoPE: position comes from a learned table indexed by ``row * S + col``, S being
``max_patches_per_side`` (BAGEL's "extrapolate" position ids). The layers after
``select_layer`` are never built, as in BAGEL.

Parameter names equal BAGEL's ``vit_model.vision_model.*`` keys without that prefix
(and Hugging Face's ``SiglipVisionTransformer`` keys), so loading a checkpoint is a pure
key map. The one difference from Hugging Face: the patch
embedding is an ``nn.Linear`` over flattened patches, not a ``Conv2d``;
``conv_patch_weight_to_linear`` converts the weight (BAGEL's checkpoints already hold
the linear form).

Shape legend: N packed patch tokens (all images), n tokens of one image, D hidden
size, H heads, Dh head dim, P = patch_size^2 * channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modus_mega.config import ViTConfig

try:  # Optional: fused varlen attention on CUDA; the per-image SDPA path is always available.
    from flash_attn import flash_attn_varlen_func

    HAVE_FLASH_ATTN = True
except ImportError:
    HAVE_FLASH_ATTN = False


def patchify_image(image: Tensor, patch_size: int) -> Tensor:
    """Cut ``image`` [C, H, W] into non-overlapping patches [h*w, p*p*C].

    Patches are listed row-major over the patch grid (h = H/p rows, w = W/p columns);
    each patch is flattened as (patch row, patch col, channel), BAGEL's order, which is
    the input order of ``SiglipNaViT.embeddings.patch_embedding``.
    """
    if image.dim() != 3:
        raise ValueError(f"patchify_image expects one image [C, H, W], got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of patch_size={patch_size}; "
            "resize or crop the image to a multiple of the patch size first"
        )
    h, w = height // patch_size, width // patch_size
    patches = image.reshape(channels, h, patch_size, w, patch_size)  # [C, h, p, w, p]
    patches = patches.permute(1, 3, 2, 4, 0)  # [h, w, p, p, C]
    return patches.reshape(h * w, patch_size * patch_size * channels)


def vit_position_ids(h: int, w: int, max_patches_per_side: int) -> Tensor:
    """Indices [h*w] into the learned position table for an h x w patch grid: ``row * S + col``."""
    if not (1 <= h <= max_patches_per_side and 1 <= w <= max_patches_per_side):
        raise ValueError(
            f"patch grid {h}x{w} does not fit the {max_patches_per_side}x{max_patches_per_side} position table; "
            "downscale the image or raise model.vit.max_patches_per_side"
        )
    rows = torch.arange(h, dtype=torch.long)
    cols = torch.arange(w, dtype=torch.long)
    return (rows[:, None] * max_patches_per_side + cols[None, :]).reshape(-1)


def conv_patch_weight_to_linear(weight: Tensor) -> Tensor:
    """Convert a ``Conv2d`` patch-embedding weight [D, C, p, p] to the linear form [D, p*p*C].

    The linear input is a patch flattened (patch row, patch col, channel), so the conv
    kernel's channel axis moves last; the bias is unchanged. Use this to load SigLIP
    checkpoints in Hugging Face layout.
    """
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"expected a square Conv2d patch weight [D, C, p, p], got shape {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _segment_lengths(cu_seqlens: Tensor, num_tokens: int) -> list[int]:
    """Per-image token counts from ``cu_seqlens``, checked against the packed length."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_images + 1], got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != num_tokens or any(n < 0 for n in lengths):
        raise ValueError(
            f"cu_seqlens {bounds} must start at 0, never decrease and end at the number of patches {num_tokens}"
        )
    return lengths


class SiglipVisionEmbeddings(nn.Module):
    """Linear patch embedding plus the learned position table (no class token)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        self.patch_embedding = nn.Linear(patch_dim, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_patches_per_side**2, cfg.hidden_size)
        nn.init.normal_(self.position_embedding.weight, std=cfg.hidden_size**-0.5)  # SigLIP's init

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        # patches [N, P], position_ids [N] -> [N, D]
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    """Multi-head self-attention confined to each packed image (no RoPE, no mask within an image)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, cu_seqlens: Tensor, lengths: list[int]) -> Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)  # [N, H, Dh]
        k = self.k_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        if HAVE_FLASH_ATTN and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and num_tokens > 0:
            cu = cu_seqlens.to(device=x.device, dtype=torch.int32)
            longest = max(lengths)
            out = flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest
            )  # [N, H, Dh]
        else:
            outs = []
            # With no images, one empty segment keeps q, k and v in the autograd graph, so a rank
            # without ViT tokens still produces (zero) gradients for every weight (DESIGN §6).
            segments = lengths or [0]
            for q_i, k_i, v_i in zip(q.split(segments), k.split(segments), v.split(segments)):
                # [n, H, Dh] -> [H, n, Dh] for SDPA; one image attends only to itself.
                o_i = F.scaled_dot_product_attention(q_i.transpose(0, 1), k_i.transpose(0, 1), v_i.transpose(0, 1))
                outs.append(o_i.transpose(0, 1))
            out = torch.cat(outs)  # [N, H, Dh]
        return self.out_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class SiglipMLP(nn.Module):
    """fc1, gelu (tanh approximation), fc2."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: Tensor, cu_seqlens: Tensor, lengths: list[int]) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, lengths)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The stack of encoder layers that actually run (``num_layers_used``)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers_used))

    def forward(self, x: Tensor, cu_seqlens: Tensor, lengths: list[int]) -> Tensor:
        for layer in self.layers:
            x = layer(x, cu_seqlens, lengths)
        return x


class SiglipNaViT(nn.Module):
    """SigLIP vision tower over packed variable-size images (BAGEL's ``vit_model.vision_model``).

    Submodules: ``embeddings.{patch_embedding, position_embedding}``,
    ``encoder.layers[i].{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1, fc2}}``
    and ``post_layernorm``; only ``cfg.num_layers_used`` layers are built.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"model.vit.num_heads={cfg.num_heads} does not divide model.vit.hidden_size={cfg.hidden_size}"
            )
        self.patch_dim = cfg.patch_size * cfg.patch_size * cfg.num_channels
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Encode packed images.

        Args:
            patches: [N, P] all images' patches (``patchify_image``), concatenated.
            position_ids: [N] long, ``vit_position_ids`` of each image, concatenated.
            cu_seqlens: [num_images + 1] int32, cumulative patch counts starting at 0
                (read to the host once per call, to split images and size flash-attn).

        Returns:
            [N, D] post-layernorm hidden states of the last built layer.
        """
        if patches.dim() != 2 or patches.shape[1] != self.patch_dim:
            raise ValueError(
                f"patches must be [N, {self.patch_dim}] (patch_size^2 * num_channels), got {tuple(patches.shape)}; "
                "build them with patchify_image"
            )
        if position_ids.shape != patches.shape[:1]:
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)} does not match {patches.shape[0]} patches"
            )
        lengths = _segment_lengths(cu_seqlens, patches.shape[0])  # tokens per image
        x = self.embeddings(patches, position_ids)  # [N, D]
        x = self.encoder(x, cu_seqlens, lengths)
        return self.post_layernorm(x)
