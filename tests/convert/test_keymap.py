"""The MODUS <-> BAGEL key map: a bijection over every tensor, matching BAGEL's module tree."""

from __future__ import annotations

import pytest
import torch

from modus_mega.config import load_config
from modus_mega.convert.keymap import bagel_to_ours, ours_to_bagel
from modus_mega.model.modus import ModusModel
from tests.convert.helpers import REPO, bagel_tensors, tiny_config


@pytest.mark.parametrize("config", ["tiny.json", "7b.json"])
def test_map_is_a_bijection_onto_bagel_names(config: str) -> None:
    cfg = load_config(REPO / "configs" / config)
    with torch.device("meta"):
        model = ModusModel(cfg.model)
    ours = list(model.state_dict())
    bagel = [ours_to_bagel(name) for name in ours]
    assert len(set(bagel)) == len(ours)
    assert [bagel_to_ours(name) for name in bagel] == ours
    assert set(bagel) == set(bagel_tensors(model, cfg.model.vocab.text_vocab_size))


@pytest.mark.parametrize(
    "ours, bagel",
    [
        ("layers.27.experts.1.q_norm.weight", "language_model.model.layers.27.self_attn.q_norm_moe_gen.weight"),
        ("layers.3.experts.0.v_proj.bias", "language_model.model.layers.3.self_attn.v_proj.bias"),
        ("layers.0.experts.1.mlp.gate_proj.weight", "language_model.model.layers.0.mlp_moe_gen.gate_proj.weight"),
        ("layers.0.experts.1.input_layernorm.weight", "language_model.model.layers.0.input_layernorm_moe_gen.weight"),
        ("final_norms.1.weight", "language_model.model.norm_moe_gen.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("vit.encoder.layers.25.mlp.fc2.bias", "vit_model.vision_model.encoder.layers.25.mlp.fc2.bias"),
        ("vit_pos_embed.pos_embed", "vit_pos_embed.pos_embed"),
        ("time_embedder.mlp.2.weight", "time_embedder.mlp.2.weight"),
    ],
)
def test_known_names(ours: str, bagel: str) -> None:
    assert ours_to_bagel(ours) == bagel and bagel_to_ours(bagel) == ours


@pytest.mark.parametrize("name", ["layers.0.experts.2.q_proj.weight", "vae.encoder.conv_in.weight", "head.weight"])
def test_unknown_modus_names_are_refused(name: str) -> None:
    with pytest.raises(KeyError, match="no BAGEL counterpart"):
        ours_to_bagel(name)


@pytest.mark.parametrize("name", ["language_model.model.layers.0.self_attn.q_proj_moe_und.weight", "vit_model.head.w"])
def test_unknown_bagel_names_are_refused(name: str) -> None:
    with pytest.raises(KeyError, match="no MODUS counterpart"):
        bagel_to_ours(name)


def test_tiny_config_is_what_the_helpers_assume() -> None:
    cfg = tiny_config().model
    assert cfg.vocab.text_vocab_size == 512 and cfg.llm.num_layers == 2 and not cfg.llm.tie_word_embeddings
