"""BAGEL in, Hugging Face and BAGEL out: bit-identical tensors and identical model outputs on a real mixed batch."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modus_mega.convert.bagel import import_bagel, load_bagel_into, save_bagel, write_bagel
from modus_mega.convert.hf import load_pretrained, open_hf, read_hf_config, save_pretrained, write_hf
from modus_mega.convert.keymap import VAE_PREFIX
from modus_mega.convert.source import ModuleSource
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.modus import ModusModel
from modus_mega.training.prepare import prepare_step_inputs
from modus_mega.vocab import build_vocabulary
from tests.convert.helpers import TOKENIZER_FILES, random_reference, tiny_config, write_release
from tests.model.helpers import packed_batch


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory):
    """A BAGEL release, loaded, then exported to HF and to BAGEL (full and text-only vocabulary)."""
    root = tmp_path_factory.mktemp("chain")
    cfg = tiny_config()
    ref, ref_vae = random_reference(cfg)
    ema = write_release(root / "bagel", cfg, ref, ref_vae)
    model, vae = ModusModel(cfg.model), FluxAutoEncoder(cfg.model.vae)
    load_bagel_into(model, vae, root / "bagel", seed=7)
    save_pretrained(model, vae, root / "hf", max_shard_bytes=200_000, tokenizer_dir=root / "bagel")
    write_bagel(open_hf(root / "hf"), model.cfg, root / "bagel_full", tokenizer_dir=root / "hf")
    save_bagel(model, vae, root / "bagel_text", text_vocab_only=True)
    return cfg, root, ema, model, vae


def forward(cfg, batch, model: ModusModel, vae: FluxAutoEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and velocities on ``batch`` (text, ViT, clean and noisy VAE tokens), its images encoded by ``vae``."""
    step = prepare_step_inputs(batch, vae, cfg.model, torch.Generator().manual_seed(0))
    types = set(step.model.token_type.tolist())
    assert types == {0, 1, 2} and step.targets.mse_index.numel() > 0 and step.targets.ce_index.numel() > 0
    with torch.no_grad():
        return model(step.model, step.targets.ce_index, step.targets.mse_index)


def test_text_only_bagel_export_is_bit_identical_to_the_input(chain) -> None:
    cfg, root, ema, _, _ = chain
    out = load_file(root / "bagel_text" / "ema.safetensors")
    assert out.keys() == ema.keys()
    for name, tensor in ema.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name
    ae_in, ae_out = load_file(root / "bagel" / "ae.safetensors"), load_file(root / "bagel_text" / "ae.safetensors")
    assert ae_in.keys() == ae_out.keys() and all(torch.equal(ae_in[k], ae_out[k]) for k in ae_in)
    llm = json.loads((root / "bagel_text" / "llm_config.json").read_text())
    assert llm["vocab_size"] == 512 and "modus_text_vocab_size" not in llm and llm["qk_norm"] is True
    vit = json.loads((root / "bagel_text" / "vit_config.json").read_text())
    assert (vit["num_hidden_layers"], vit["image_size"], vit["patch_size"]) == (3, 64, 8)


def test_full_bagel_export_keeps_bagel_rows_and_adds_modus_rows(chain) -> None:
    cfg, root, ema, model, _ = chain
    out = load_file(root / "bagel_full" / "ema.safetensors")
    assert out.keys() == ema.keys()
    for name, tensor in ema.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert out[name].shape[0] == model.vocab.padded_size and torch.equal(out[name][:512], tensor)
        else:
            assert torch.equal(out[name], tensor), name
    assert torch.equal(out["language_model.lm_head.weight"], model.lm_head.weight)
    llm = json.loads((root / "bagel_full" / "llm_config.json").read_text())
    assert (llm["vocab_size"], llm["modus_text_vocab_size"]) == (model.vocab.padded_size, 512)
    for name, text in TOKENIZER_FILES.items():
        assert (root / "bagel_full" / name).read_text() == text


def test_hf_layout_is_sharded_indexed_and_complete(chain) -> None:
    cfg, root, _, model, vae = chain
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    expected = {**model.state_dict(), **{VAE_PREFIX + n: t for n, t in vae.state_dict().items()}}
    assert index["weight_map"].keys() == expected.keys()
    total = 0
    for shard in shards:
        with safe_open(str(root / "hf" / shard), "pt") as f:
            sizes = [f.get_tensor(n).numel() * 4 for n in f.keys()]
            assert sum(sizes) <= 200_000 or len(sizes) == 1
            total += sum(sizes)
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), expected[name]), name
    assert index["metadata"]["total_size"] == total
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["vocabulary"]["start_markers"]["caption"] == model.vocab.start_marker("caption")
    assert config["vocabulary"]["padded_size"] == model.vocab.padded_size and config["has_vae"]
    assert [m["name"] for m in config["modalities"]][:2] == ["rgb", "depth"]
    assert read_hf_config(root / "hf")[0] == cfg.model
    assert (root / "hf" / "tokenizer.json").read_text() == TOKENIZER_FILES["tokenizer.json"]


def test_models_from_every_layout_give_identical_outputs(chain, tmp_path: Path) -> None:
    cfg, root, _, model, vae = chain
    batch = packed_batch(cfg, build_vocabulary(cfg.model.vocab), num_samples=3, seed=0)
    expected = forward(cfg, batch, model, vae)
    import_bagel(root / "bagel", cfg.model, tmp_path / "imported", seed=7)
    candidates = {"hf": load_pretrained(root / "hf"), "from-bagel": load_pretrained(tmp_path / "imported")}
    for name, path in (("bagel full", root / "bagel_full"), ("bagel text-only", root / "bagel_text")):
        m, v = ModusModel(cfg.model), FluxAutoEncoder(cfg.model.vae)
        load_bagel_into(m, v, path, seed=7)
        candidates[name] = (m, v)
    for name, (m, v) in candidates.items():
        logits, velocity = forward(cfg, batch, m, v)
        assert torch.equal(logits, expected[0]) and torch.equal(velocity, expected[1]), name


def test_hf_round_trip_with_dtype_cast_is_exact(chain, tmp_path: Path) -> None:
    cfg, root, _, model, _ = chain
    with open_hf(root / "hf") as source:
        write_hf(source, cfg.model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    m, _ = load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, with_vae=False)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(m.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_export_holds_one_tensor_at_a_time(chain, tmp_path: Path) -> None:
    cfg, _, _, model, vae = chain
    alive: weakref.WeakSet = weakref.WeakSet()
    peak = [0]

    class Spy(ModuleSource):
        def lazy(self, name: str) -> torch.Tensor:
            tensor = super().lazy(name).clone()
            alive.add(tensor)
            peak[0] = max(peak[0], len(alive))
            return tensor

    write_hf(Spy({"": model, VAE_PREFIX: vae}), cfg.model, tmp_path / "hf", max_shard_bytes=10**9)
    assert peak[0] == 1


def test_failed_export_leaves_nothing_behind(chain, tmp_path: Path) -> None:
    cfg, _, _, model, vae = chain

    class Failing(ModuleSource):
        def lazy(self, name: str) -> torch.Tensor:
            if name == "llm2vae.weight":
                raise OSError("disk full")
            return super().lazy(name)

    with pytest.raises(OSError, match="disk full"):
        write_hf(Failing({"": model, VAE_PREFIX: vae}), cfg.model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_hf_checkpoints_are_refused(chain, tmp_path: Path) -> None:
    cfg, root, _, _, _ = chain
    path = tmp_path / "hf"
    shutil.copytree(root / "hf", path)
    config = json.loads((path / "config.json").read_text())
    config["vocabulary"]["coordinates"] = [0, 1]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"vocabulary table differs.*\['coordinates'\]"):
        load_pretrained(path)
    shutil.copyfile(root / "hf" / "config.json", path / "config.json")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00099.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00001-of-00099\.safetensors does not exist"):
        load_pretrained(path)
