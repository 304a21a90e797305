"""Tiny BAGEL-layout checkpoints written by the tests themselves.

BAGEL's key names are spelled out here by walking BAGEL's module tree by hand
(``language_model.model.layers.{i}.self_attn.q_proj_moe_gen`` ...), independently of
``modus_mega/convert/keymap.py``, so a wrong entry in the key map fails the tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from modus_mega.config import ModusConfig, load_config
from modus_mega.convert.release import ae_json_config
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_FILES = {"tokenizer.json": '{"model": "tiny"}\n', "tokenizer_config.json": "{}\n", "merges.txt": "#v\n"}


def tiny_config() -> ModusConfig:
    """configs/tiny.json (a fresh copy)."""
    return copy.deepcopy(load_config(REPO / "configs" / "tiny.json"))


@torch.no_grad()
def random_reference(cfg: ModusConfig, seed: int = 1) -> tuple[ModusModel, FluxAutoEncoder]:
    """A model and VAE with every tensor random (biases and norms too) but the fixed sin-cos tables."""
    model = ModusModel(cfg.model)
    init_weights(model, seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, seed + 1, std=0.05, prefix="vae.")
    for name, p in vae.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, vae


def bagel_tensors(model: ModusModel, text_rows: int) -> dict[str, Tensor]:
    """BAGEL's ema.safetensors contents for ``model``: BAGEL names, the text vocabulary rows only."""
    out: dict[str, Tensor] = {}
    lm = "language_model.model."
    out[lm + "embed_tokens.weight"] = model.embed_tokens.weight[:text_rows]
    out["language_model.lm_head.weight"] = model.lm_head.weight[:text_rows]
    out[lm + "norm.weight"] = model.final_norms[0].weight
    out[lm + "norm_moe_gen.weight"] = model.final_norms[1].weight
    for i, layer in enumerate(model.layers):
        for expert, sfx in zip(layer.experts, ("", "_moe_gen")):
            attn = f"{lm}layers.{i}.self_attn."
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{attn}{proj}{sfx}.weight"] = getattr(expert, proj).weight
                out[f"{attn}{proj}{sfx}.bias"] = getattr(expert, proj).bias
            out[f"{attn}o_proj{sfx}.weight"] = expert.o_proj.weight
            out[f"{attn}q_norm{sfx}.weight"] = expert.q_norm.weight
            out[f"{attn}k_norm{sfx}.weight"] = expert.k_norm.weight
            out[f"{lm}layers.{i}.input_layernorm{sfx}.weight"] = expert.input_layernorm.weight
            out[f"{lm}layers.{i}.post_attention_layernorm{sfx}.weight"] = expert.post_attention_layernorm.weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{lm}layers.{i}.mlp{sfx}.{proj}.weight"] = getattr(expert.mlp, proj).weight
    for name, t in model.vit.state_dict().items():
        out["vit_model.vision_model." + name] = t
    for module in ("time_embedder", "vae2llm", "llm2vae", "latent_pos_embed", "connector", "vit_pos_embed"):
        for name, t in getattr(model, module).state_dict().items():
            out[f"{module}.{name}"] = t
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def bagel_llm_config(cfg: ModusConfig) -> dict:
    """An llm_config.json as BAGEL ships it (no qk_norm / layer_module: BAGEL's loader sets those)."""
    llm = cfg.model.llm
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": llm.intermediate_size,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers,
        "num_key_value_heads": llm.num_kv_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.model.vocab.text_vocab_size,
    }


def bagel_vit_config(cfg: ModusConfig) -> dict:
    """A vit_config.json as BAGEL ships it (layer_norm_eps and num_channels left to their defaults)."""
    vit = cfg.model.vit
    return {
        "hidden_size": vit.hidden_size,
        "image_size": vit.max_patches_per_side * vit.patch_size,
        "intermediate_size": vit.intermediate_size,
        "model_type": "siglip_vision_model",
        "num_attention_heads": vit.num_heads,
        "num_hidden_layers": vit.num_layers_used + 1,
        "patch_size": vit.patch_size,
    }


def write_release(
    out: Path, cfg: ModusConfig, model: ModusModel, vae: FluxAutoEncoder, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Write a BAGEL release directory for ``model``/``vae``; returns the ema tensors as written."""
    out.mkdir(parents=True, exist_ok=True)
    ema = {k: v.to(dtype) for k, v in bagel_tensors(model, cfg.model.vocab.text_vocab_size).items()}
    save_file(ema, out / "ema.safetensors", metadata={"format": "pt"})
    save_file({k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}, out / "ae.safetensors")
    (out / "llm_config.json").write_text(json.dumps(bagel_llm_config(cfg)))
    (out / "vit_config.json").write_text(json.dumps(bagel_vit_config(cfg)))
    (out / "ae_config.json").write_text(json.dumps(ae_json_config(cfg.model)))  # the tiny VAE is not FLUX's
    for name, text in TOKENIZER_FILES.items():
        (out / name).write_text(text)
    return ema
