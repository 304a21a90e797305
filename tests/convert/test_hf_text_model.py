"""``to-hf --text-model``: the 1D expert as a stock ``Qwen3ForCausalLM``, loaded by vanilla ``transformers``.

The export of a tiny model with every weight random (biases and norms too) loads with
``AutoModelForCausalLM.from_pretrained`` (model type ``qwen3``, no ``auto_map``: no code of
ours) and its logits on packed text equal MODUS's in fp32 within 1e-4, with the whole
extended vocabulary (new-token ids in the input too) and with the pretrained text rows only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from modus_mega.convert.__main__ import main
from modus_mega.convert.hf import save_pretrained
from modus_mega.convert.text_model import text_model_config
from modus_mega.model.modus import ModusModel
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from tests.convert.helpers import random_reference, tiny_config
from tests.model.test_hf_parity import text_inputs

LENGTHS = [9, 1, 17, 5]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModusModel, Path]:
    """A random model saved in the hf layout, with a real tiny tokenizer."""
    root = tmp_path_factory.mktemp("text_model")
    cfg = tiny_config()
    model, vae = random_reference(cfg)
    model.eval()
    tokenizer = train_tiny_text_tokenizer(["a red cube", "two green spheres", "a blue cone"], 280, root / "tokenizer")
    save_pretrained(model, vae, root / "hf", tokenizer_dir=tokenizer)
    return model, root / "hf"


@pytest.mark.parametrize("text_vocab_only", [False, True])
def test_vanilla_transformers_computes_our_text_logits(checkpoint, tmp_path: Path, text_vocab_only: bool) -> None:
    model, hf_dir = checkpoint
    flags = ["--text-model", "--max-shard-size", "100KB", "--quiet"] + ["--text-vocab-only"] * text_vocab_only
    main(["to-hf", str(hf_dir), str(tmp_path / "lm"), *flags])
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert "auto_map" not in config
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float32)
    assert type(lm) is Qwen3ForCausalLM
    rows = model.vocab.text.stop if text_vocab_only else model.vocab.padded_size
    assert lm.lm_head.weight.shape[0] == rows
    index = json.loads((tmp_path / "lm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded

    cfg = model.cfg
    id_range = model.vocab.text.stop if text_vocab_only else model.vocab.num_tokens  # new tokens too
    inputs, ids = text_inputs(cfg, LENGTHS, id_range)
    with torch.no_grad():
        ours, _ = model(inputs, torch.arange(sum(LENGTHS)), torch.zeros(0, dtype=torch.long))
        theirs = torch.cat([lm(input_ids=x[None]).logits[0] for x in ids])
    torch.testing.assert_close(theirs, ours[:, :rows], rtol=1e-4, atol=1e-4)
    expected = AutoTokenizer.from_pretrained(hf_dir).encode("a red cube")
    assert AutoTokenizer.from_pretrained(tmp_path / "lm").encode("a red cube") == expected


def test_bad_requests_are_refused(checkpoint, tmp_path: Path, capsys) -> None:
    _, hf_dir = checkpoint
    with pytest.raises(SystemExit) as e:
        main(["to-hf", str(hf_dir), str(tmp_path / "out"), "--text-vocab-only", "--quiet"])
    assert e.value.code == 2 and "add --text-model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    cfg = tiny_config().model
    cfg.llm.qk_norm = False
    with pytest.raises(ValueError, match="model.llm.qk_norm is false"):
        text_model_config(cfg, 512, torch.float32)
