"""Loading a BAGEL release: every tensor in place, the vocabulary extended, bad checkpoints refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modus_mega.config import load_config
from modus_mega.convert.bagel import BagelSource, load_bagel_into
from modus_mega.convert.release import check_bagel_config, release_model_config
from modus_mega.convert.source import NEW_ROW_NOISE, VocabRowsSource, load_into
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.init import init_weights
from modus_mega.seeding import derive_seed
from modus_mega.model.modus import ModusModel
from tests.convert.helpers import REPO, bagel_tensors, random_reference, tiny_config, write_release


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):
    """(cfg, reference model, reference VAE, release dir, ema tensors as written)."""
    cfg = tiny_config()
    model, vae = random_reference(cfg)
    path = tmp_path_factory.mktemp("bagel") / "release"
    ema = write_release(path, cfg, model, vae)
    return cfg, model, vae, path, ema


def fresh(cfg) -> tuple[ModusModel, FluxAutoEncoder]:
    """A model and VAE initialised differently from the reference (so loading must overwrite all)."""
    model, vae = ModusModel(cfg.model), FluxAutoEncoder(cfg.model.vae)
    init_weights(model, seed=99, std=0.5)
    init_weights(vae, seed=99, std=0.5)
    return model, vae


def expected_rows(text: torch.Tensor, rows: int, seed: int, name: str) -> torch.Tensor:
    """The documented new-row scheme, written out directly: mean + 0.02 * std * z."""
    t = text.double()
    z = torch.randn(rows - t.shape[0], t.shape[1], generator=torch.Generator().manual_seed(derive_seed(seed, name)),
                    dtype=torch.float64)  # fmt: skip
    return (t.mean(0) + NEW_ROW_NOISE * t.std(0, unbiased=False) * z).float()


def copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_every_tensor_lands_in_place_and_bagel_rows_are_bit_identical(release) -> None:
    cfg, ref, ref_vae, path, ema = release
    model, vae = fresh(cfg)
    load_bagel_into(model, vae, path, seed=3)
    text = cfg.model.vocab.text_vocab_size
    loaded = bagel_tensors(model, text)
    assert loaded.keys() == ema.keys()
    for name, tensor in ema.items():
        assert torch.equal(loaded[name], tensor), name
    for name, tensor in ref_vae.state_dict().items():
        assert torch.equal(vae.state_dict()[name], tensor), f"vae.{name}"
    rows = model.vocab.padded_size
    for name, param, bagel_name in (
        ("embed_tokens.weight", model.embed_tokens.weight, "language_model.model.embed_tokens.weight"),
        ("lm_head.weight", model.lm_head.weight, "language_model.lm_head.weight"),
    ):
        assert param.shape[0] == rows > text
        bagel = ema[bagel_name]
        assert torch.equal(param[:text], bagel)
        torch.testing.assert_close(param[text:], expected_rows(bagel, rows, 3, name), rtol=0, atol=1e-6)


def test_new_rows_depend_on_the_seed_only(release) -> None:
    cfg, _, _, path, _ = release
    text = cfg.model.vocab.text_vocab_size
    a, b, c = (fresh(cfg)[0] for _ in range(3))
    load_bagel_into(a, None, path, seed=0)
    load_bagel_into(b, None, path, seed=0)
    load_bagel_into(c, None, path, seed=1)
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert not torch.equal(a.embed_tokens.weight[text:], c.embed_tokens.weight[text:])
    assert not torch.equal(a.embed_tokens.weight[text:], a.lm_head.weight[text:])


def test_bf16_release_loads_exactly(release, tmp_path: Path) -> None:
    cfg, ref, ref_vae, _, _ = release
    ema = write_release(tmp_path / "bf16", cfg, ref, ref_vae, dtype=torch.bfloat16)
    model, vae = fresh(cfg)
    load_bagel_into(model, vae, tmp_path / "bf16")
    loaded = bagel_tensors(model, cfg.model.vocab.text_vocab_size)
    for name, tensor in ema.items():
        assert torch.equal(loaded[name].to(torch.bfloat16), tensor), name


def test_model_config_derived_from_bagel_files(release) -> None:
    cfg, _, _, path, _ = release
    base = tiny_config().model
    base.llm.num_layers, base.vit.num_layers, base.vit.max_patches_per_side = 7, 9, 3
    derived = release_model_config(path, base)
    assert (derived.llm.num_layers, derived.vit.num_layers_used, derived.vit.max_patches_per_side) == (2, 2, 8)
    check_bagel_config(derived, path)
    assert derived.vocab.coordinate_bins == base.vocab.coordinate_bins  # MODUS-only fields are kept


def test_7b_config_matches_the_bagel_7b_mot_release_configs(tmp_path: Path) -> None:
    """configs/7b.json against the JSON files of the BAGEL-7B-MoT release (their architecture keys)."""
    llm = {"hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
           "tie_word_embeddings": False, "vocab_size": 152064, "model_type": "qwen2"}  # fmt: skip
    vit = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
           "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}  # fmt: skip
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    (tmp_path / "vit_config.json").write_text(json.dumps(vit))
    check_bagel_config(load_config(REPO / "configs" / "7b.json").model, tmp_path)


def test_shard_hook_reads_slices_of_the_extended_tensors(release) -> None:
    """A rank holding half of the LM head rows (vocab-parallel) gets exactly its rows, new rows included."""
    cfg, _, _, path, _ = release
    full, _ = fresh(cfg)
    load_bagel_into(full, None, path, seed=5)
    rows, dim = full.lm_head.weight.shape
    stage = torch.nn.Module()
    stage.lm_head = torch.nn.Linear(dim, rows // 2, bias=False)
    seen = []

    def shard(param: torch.Tensor, lazy) -> torch.Tensor:
        seen.append(list(lazy.shape))
        return lazy[rows // 2 :]

    with BagelSource(path, with_vae=False) as source:
        vocab_rows = VocabRowsSource(source, rows, cfg.model.vocab.text_vocab_size, seed=5)
        load_into({"": stage}, vocab_rows, shard=shard, full_shape=lambda p: torch.Size([rows, dim]), allow_unused=True)
    assert seen == [[rows, dim]]
    assert torch.equal(stage.lm_head.weight, full.lm_head.weight[rows // 2 :])


def test_lazy_slices_of_a_plain_tensor_read_only_the_slice(release) -> None:
    cfg, _, _, path, ema = release
    with BagelSource(path) as source:
        lazy = source.lazy("layers.1.experts.1.q_proj.weight")
        assert not isinstance(lazy, torch.Tensor)
        reference = ema["language_model.model.layers.1.self_attn.q_proj_moe_gen.weight"]
        assert torch.equal(lazy[3:7], reference[3:7]) and torch.equal(lazy[:, 5:9], reference[:, 5:9])


# ----------------------------------------------------------------------------- refused checkpoints


def edit_ema(path: Path, edit) -> None:
    tensors = load_file(path / "ema.safetensors")
    edit(tensors)
    save_file(tensors, path / "ema.safetensors")


def test_missing_tensor_is_refused_with_both_names(release, tmp_path: Path) -> None:
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    edit_ema(path, lambda t: t.pop("language_model.model.layers.1.mlp_moe_gen.down_proj.weight"))
    both_names = r"'layers\.1\.experts\.1\.mlp\.down_proj\.weight'.*'language_model\.model\.layers\.1\.mlp_moe_gen"
    with pytest.raises(ValueError, match=r"1 tensor\(s\) missing.*" + both_names):
        load_bagel_into(fresh(cfg)[0], None, path)


def test_extra_tensors_are_refused_by_name(release, tmp_path: Path) -> None:
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    edit_ema(path, lambda t: t.update({"language_model.model.layers.2.mlp.up_proj.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"model does not have.*layers\.2\.experts\.0\.mlp\.up_proj\.weight"):
        load_bagel_into(fresh(cfg)[0], None, path)
    edit_ema(path, lambda t: t.update({"unknown_head.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"'unknown_head\.weight'.*no MODUS counterpart"):
        load_bagel_into(fresh(cfg)[0], None, path)


def test_wrong_shape_is_refused_with_both_shapes(release, tmp_path: Path) -> None:
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    edit_ema(path, lambda t: t.update({"language_model.model.layers.0.self_attn.k_proj.weight": torch.zeros(31, 64)}))
    with pytest.raises(ValueError, match=r"experts\.0\.k_proj\.weight.*checkpoint \[31, 64\], model \[32, 64\]"):
        load_bagel_into(fresh(cfg)[0], None, path)


def test_wrong_vocabulary_rows_are_refused(release, tmp_path: Path) -> None:
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    edit_ema(path, lambda t: t.update({"language_model.lm_head.weight": torch.zeros(500, 64)}))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*shape \[500, 64\].*\[512, D\].*\[832, D\]"):
        load_bagel_into(fresh(cfg)[0], None, path)


def test_truncated_safetensors_is_refused(release, tmp_path: Path) -> None:
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    data = (path / "ae.safetensors").read_bytes()
    (path / "ae.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"ae\.safetensors is not a readable safetensors file.*truncated"):
        load_bagel_into(*fresh(cfg), path)


def test_mismatched_llm_config_names_both_values(release, tmp_path: Path) -> None:
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    llm = json.loads((path / "llm_config.json").read_text())
    llm["num_hidden_layers"] = 3
    (path / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(ValueError, match=r"llm_config\.json: num_hidden_layers = 3, but .*model\.llm\.num_layers = 2"):
        load_bagel_into(fresh(cfg)[0], None, path)
    vit = json.loads((src / "vit_config.json").read_text())
    vit["image_size"] = 72
    (path / "vit_config.json").write_text(json.dumps(vit))
    (path / "llm_config.json").write_text((src / "llm_config.json").read_text())
    with pytest.raises(ValueError, match=r"image_size / patch_size = 9, but .*model\.vit\.max_patches_per_side = 8"):
        load_bagel_into(fresh(cfg)[0], None, path)


def test_sincos_table_of_another_convention_is_refused(release, tmp_path: Path) -> None:
    """A latent table indexed column-major (c * S + r) instead of BAGEL's row-major order."""
    cfg, _, _, src, _ = release
    path = copy_release(src, tmp_path / "r")
    side = cfg.model.max_latent_size

    def transpose(t: dict) -> None:
        table = t["latent_pos_embed.pos_embed"]
        t["latent_pos_embed.pos_embed"] = table.view(side, side, -1).transpose(0, 1).reshape(side * side, -1).clone()

    edit_ema(path, transpose)
    with pytest.raises(ValueError, match=r"latent_pos_embed\.pos_embed.*differs from MODUS's 2D sin-cos table"):
        load_bagel_into(fresh(cfg)[0], None, path)


def test_config_fields_fixed_by_bagel_code_are_checked(release) -> None:
    cfg, _, _, path, _ = release
    bad = tiny_config().model
    bad.llm.qk_norm = False
    with pytest.raises(ValueError, match=r"qk_norm = True, but the model config has model\.llm\.qk_norm = False"):
        check_bagel_config(bad, path)
