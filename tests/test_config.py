"""Config loading: typed tree, overrides, and errors that name the key, the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modus_mega.config import config_to_dict, load_config
from modus_mega.model.params import count_parameters

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    return path


def tiny_raw() -> dict:
    return json.loads((REPO / "configs" / "tiny.json").read_text())


def test_configs_load_and_7b_is_bagel() -> None:
    cfg = load_config(REPO / "configs" / "7b.json")
    llm = cfg.model.llm
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads, llm.head_dim) == (3584, 28, 28, 4, 128)
    assert (llm.intermediate_size, cfg.model.vocab.text_vocab_size, llm.rope_theta) == (18944, 152064, 1e6)
    assert llm.qkv_bias and not llm.o_bias and llm.qk_norm and not llm.tie_word_embeddings
    vit = cfg.model.vit
    assert (vit.hidden_size, vit.intermediate_size, vit.num_heads, vit.num_layers_used, vit.patch_size) == (
        1152, 4304, 16, 26, 14)  # fmt: skip
    assert vit.max_patches_per_side == 70
    vae = cfg.model.vae
    assert (vae.latent_channels, vae.base_channels, vae.channel_multipliers) == (16, 128, [1, 2, 4, 4])
    assert (vae.scale_factor, vae.shift_factor, cfg.model.latent_patch_size, cfg.model.max_latent_size) == (
        0.3611, 0.1159, 2, 64)  # fmt: skip
    load_config(REPO / "configs" / "tiny.json")


def test_7b_parameter_counts() -> None:
    """BAGEL-7B-MoT: about 14.1B LLM parameters in all, about 7.6B active per token."""
    count = count_parameters(load_config(REPO / "configs" / "7b.json").model)
    pretrained_total = count.llm_total - count.new_vocab_rows
    pretrained_active = count.llm_active - count.new_vocab_rows
    assert 14.0e9 < pretrained_total < 14.2e9
    assert 7.5e9 < pretrained_active < 7.7e9
    assert count.llm_total - count.llm_active == count.per_expert


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, tiny_raw()), ["training.steps=7", "data.condition_mode_2d=vit", "model.llm.rope_theta=5"])
    assert cfg.training.steps == 7 and cfg.data.condition_mode_2d == "vit"
    assert cfg.model.llm.rope_theta == 5.0 and isinstance(cfg.model.llm.rope_theta, float)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["model"]["llm"].update(num_hedas=4), "unknown key 'model.llm.num_hedas'"),
        (lambda r: r.update(trainig={}), "unknown key 'trainig'"),
        (lambda r: r["training"].update(steps="ten"), "training.steps must be int"),
        (lambda r: r["model"]["llm"].update(num_kv_heads=3), "model.llm.num_kv_heads"),
        (lambda r: r["parallel"].update(tp=3), "parallel.tp"),
        (lambda r: r["parallel"].update(pp=2, zero_stage=3), "cannot be combined with pipeline"),
        (lambda r: r["data"].update(condition_mode_2d="pixels"), "data.condition_mode_2d"),
        (lambda r: r["data"].update(target_weights={"rgbd": 1.0}), "unknown modality 'rgbd'"),
        (lambda r: r["data"].update(target_weights={"rgb": 0.0}), "at least one modality a positive weight"),
    ],
)
def test_errors_name_the_key_and_the_file(tmp_path: Path, edit, message: str) -> None:
    raw = tiny_raw()
    edit(raw)
    path = write(tmp_path, raw)
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_bad_override_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, tiny_raw())
    with pytest.raises(ValueError, match="a.b=c"):
        load_config(path, ["training.steps"])
    with pytest.raises(ValueError, match="unknown key 'training.stepz'"):
        load_config(path, ["training.stepz=3"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_round_trip_through_saved_dict(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs" / "tiny.json")
    again = load_config(write(tmp_path, config_to_dict(cfg)))
    assert config_to_dict(again) == config_to_dict(cfg)
