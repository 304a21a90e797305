"""The model config derived from a BAGEL release itself, and every mismatch reported at once."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from modus_mega.config import config_to_dict, load_config
from modus_mega.convert.__main__ import main
from modus_mega.convert.hf import read_hf_config
from modus_mega.convert.release import check_bagel_config, release_model_config
from tests.convert.helpers import REPO, random_reference, tiny_config, write_release


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("release") / "bagel"
    write_release(path, cfg, *random_reference(cfg))
    return path


def test_the_release_determines_the_tiny_model(release: Path) -> None:
    tiny = tiny_config().model
    assert config_to_dict(release_model_config(release, base=tiny)) == config_to_dict(tiny)


def test_every_mismatch_is_reported_at_once_with_the_fix(release: Path) -> None:
    bad = tiny_config()
    bad.model.llm.num_layers, bad.model.vit.patch_size, bad.model.max_latent_size = 4, 4, 16
    bad.model.vae.norm_groups, bad.model.vae.scale_factor = 4, 0.5
    with pytest.raises(ValueError) as info:
        check_bagel_config(bad.model, release)
    message = str(info.value)
    assert "in 5 field(s)" in message, message
    for field in ("llm.num_layers = 4", "vit.patch_size = 4", "max_latent_size = 16", "vae.norm_groups = 4",
                  "vae.scale_factor = 0.5"):  # fmt: skip
        assert f"the model config has model.{field}" in message, field
    fixes = shlex.split(message.split("fix those fields: ")[1])[1::2]  # "--set a=b --set c=d"
    bad_fixed = load_config(REPO / "configs" / "tiny.json", [
        "model.llm.num_layers=4", "model.vit.patch_size=4", "model.max_latent_size=16", "model.vae.norm_groups=4",
        "model.vae.scale_factor=0.5", *fixes])  # fmt: skip
    check_bagel_config(bad_fixed.model, release)  # the printed overrides repair the bad config


def test_vision_markers_come_from_the_tokenizer(release: Path, tmp_path: Path) -> None:
    path = tmp_path / "bagel"
    shutil.copytree(release, path)
    added = [{"id": 510, "content": "<|vision_start|>", "special": True}, {"id": 511, "content": "<|vision_end|>"}]
    (path / "tokenizer.json").write_text(json.dumps({"model": "tiny", "added_tokens": added}))
    derived = release_model_config(path, base=tiny_config().model)
    assert (derived.vocab.vision_start_id, derived.vocab.vision_end_id) == (510, 511)
    mismatch = r"<\|vision_start\|> = 510, but the model config has model\.vocab\.vision_start_id = None"
    with pytest.raises(ValueError, match=mismatch):
        check_bagel_config(tiny_config().model, path)


def test_without_ae_config_the_autoencoder_is_flux(tmp_path: Path) -> None:
    """The BAGEL-7B-MoT release's JSON files alone give configs/7b.json's model (FLUX's autoencoder)."""
    llm = {"hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
           "vocab_size": 152064}  # fmt: skip
    vit = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "num_attention_heads": 16,
           "num_hidden_layers": 27, "patch_size": 14}  # fmt: skip
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    (tmp_path / "vit_config.json").write_text(json.dumps(vit))
    with pytest.raises(ValueError, match=r"no tokenizer files .* <\|vision_start\|> and <\|vision_end\|> are unknown"):
        release_model_config(tmp_path)
    markers = {"151652": {"content": "<|vision_start|>"}, "151653": {"content": "<|vision_end|>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": markers}))
    seven_b = load_config(REPO / "configs" / "7b.json").model
    assert config_to_dict(release_model_config(tmp_path)) == config_to_dict(seven_b)
    seven_b.vae.norm_groups = 16
    with pytest.raises(ValueError, match=r"FLUX\.1's autoencoder, whose norm_groups is 32, but .* = 16"):
        check_bagel_config(seven_b, tmp_path)


def test_from_bagel_needs_no_config(release: Path, tmp_path: Path) -> None:
    main(["from-bagel", str(release), str(tmp_path / "hf"), "--quiet"])
    cfg, _ = read_hf_config(tmp_path / "hf")
    assert (cfg.llm.num_layers, cfg.vit.patch_size, cfg.vae.norm_groups) == (2, 8, 8)
