"""The MoT decoder equals Hugging Face's Qwen3 / Qwen2 on text when both experts are equal.

Oracle: ``transformers`` Qwen3ForCausalLM (QK norm; attention_bias=True with the o_proj
bias zeroed, since Qwen2/BAGEL have q/k/v biases but none on o) and Qwen2ForCausalLM (no
QK norm), on the same random weights, fp32.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from modus_mega.model.init import init_weights
from modus_mega.model.inputs import TOKEN_TEXT, ModelInputs
from modus_mega.model.modus import ModusModel
from modus_mega.ops.mask import lo_hi_for_layout, padding_lo_hi
from tests.model.helpers import step_inputs


def text_inputs(cfg, lengths: list[int], vocab: int, seed: int = 0) -> tuple[ModelInputs, list[torch.Tensor]]:
    """Packed text-only inputs for samples of ``lengths``; positions restart per sample."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(vocab, (n,), generator=g) for n in lengths]
    lo, hi = lo_hi_for_layout([[("causal", n)] for n in lengths])
    total = sum(lengths)
    inputs = ModelInputs(
        input_ids=torch.cat(ids),
        token_type=torch.full((total,), TOKEN_TEXT),
        position_ids=torch.cat([torch.arange(n) for n in lengths]),
        attn_lo=lo,
        attn_hi=hi,
        vit_patches=torch.zeros(0, cfg.vit.num_channels * cfg.vit.patch_size**2),
        vit_position_ids=torch.zeros(0, dtype=torch.long),
        vit_cu_seqlens=torch.zeros(1, dtype=torch.int32),
        vae_tokens=torch.zeros(0, cfg.patch_latent_dim),
        vae_timesteps=torch.zeros(0),
        vae_position_ids=torch.zeros(0, dtype=torch.long),
    )
    return inputs, ids


def copy_into_hf(model: ModusModel, hf: torch.nn.Module) -> None:
    """Load our 1D expert's weights into the HF model by name; check every HF weight is set."""
    ours = dict(model.named_parameters())
    mapping = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "final_norms.0.weight",
               "lm_head.weight": "lm_head.weight"}  # fmt: skip
    for i in range(len(model.layers)):
        prefix = f"layers.{i}.experts.0."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            for kind in ("weight", "bias"):
                mapping[f"model.layers.{i}.self_attn.{name}.{kind}"] = f"{prefix}{name}.{kind}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            mapping[f"model.layers.{i}.{name}.weight"] = f"{prefix}{name}.weight"
        for name in ("gate_proj", "up_proj", "down_proj"):
            mapping[f"model.layers.{i}.mlp.{name}.weight"] = f"{prefix}mlp.{name}.weight"
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("o_proj.bias"):
                param.zero_()
                continue
            assert name in mapping, f"no mapping for HF weight {name}"
            param.copy_(ours[mapping[name]])


def mirror_experts(model: ModusModel) -> None:
    """Copy the 1D expert's weights (and final norm) into the 2D expert."""
    with torch.no_grad():
        for layer in model.layers:
            layer.experts[1].load_state_dict(layer.experts[0].state_dict())
        model.final_norms[1].load_state_dict(model.final_norms[0].state_dict())


def perturb_norms(model: ModusModel) -> None:
    """Norm weights start at one; make them random so the test sees their use."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_text_forward_matches_transformers(tiny_config, qk_norm: bool) -> None:
    cfg = tiny_config.model
    cfg.llm.qk_norm = qk_norm
    cfg.llm.rope_theta = 10000.0
    model = ModusModel(cfg)
    init_weights(model, seed=1, std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    perturb_norms(model)
    mirror_experts(model)
    llm = cfg.llm
    common = dict(
        vocab_size=model.vocab.padded_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta, tie_word_embeddings=False,
    )  # fmt: skip
    if qk_norm:
        hf = Qwen3ForCausalLM(Qwen3Config(head_dim=llm.head_dim, attention_bias=True, **common))
    else:
        assert llm.head_dim * llm.num_heads == llm.hidden_size
        hf = Qwen2ForCausalLM(Qwen2Config(**common))
    copy_into_hf(model, hf)
    hf.eval()

    lengths = [9, 1, 17, 5]
    inputs, ids = text_inputs(cfg, lengths, model.vocab.padded_size)
    total = sum(lengths)
    logits, _ = model(inputs, torch.arange(total), torch.zeros(0, dtype=torch.long))
    expected = torch.cat([hf(input_ids=x[None]).logits[0] for x in ids])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_routing_perturbing_an_expert_changes_only_its_tokens(tiny_config) -> None:
    """With attention confined to each token itself, a layer is per-token, so perturbing one
    expert's weights must change exactly that expert's tokens' outputs."""
    model = ModusModel(tiny_config.model)
    init_weights(model, seed=2, std=0.1)
    layer = model.layers[0]
    inputs = step_inputs(tiny_config, model.vocab).model
    num_tokens = inputs.token_type.numel()
    inputs.attn_lo, inputs.attn_hi = padding_lo_hi(0, num_tokens)
    ctx = model.build_context(inputs)
    assert all(index.numel() > 0 for index in ctx.expert_index), "the batch must route tokens to both experts"
    x = torch.randn(num_tokens, tiny_config.model.llm.hidden_size)
    base = layer(x, ctx)
    for expert in (0, 1):
        with torch.no_grad():
            saved = [p.clone() for p in layer.experts[expert].parameters()]
            for p in layer.experts[expert].parameters():
                p.add_(torch.randn_like(p) * 0.1)
            changed = (layer(x, ctx) - base).abs().amax(dim=1) > 1e-6
            for p, s in zip(layer.experts[expert].parameters(), saved):
                p.copy_(s)
        owned = torch.zeros(num_tokens, dtype=torch.bool)
        owned[ctx.expert_index[expert]] = True
        assert changed[owned].all(), f"some of expert {expert}'s tokens did not change"
        assert not changed[~owned].any(), f"perturbing expert {expert} changed the other expert's tokens"
