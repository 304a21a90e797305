"""``AutoModel.from_pretrained`` and ``save_pretrained`` on the directories ``to-hf`` writes.

Two sources: a tiny BAGEL release (``from-bagel``, then ``to-hf``) and a one-step training
run started from it (``to-hf`` of its DeepSpeed checkpoint). Each output loads through
``AutoModel`` as ``ModusHFModel`` with the outputs of ``load_pretrained`` on a mixed batch
(text, ViT, clean and noisy VAE tokens); ``save_pretrained`` writes the same config and
tensor names and reloads bit for bit; the release's (tiny, trained) tokenizer loads through
``AutoTokenizer`` from the output; ``to-hf --text-model`` of the run holds its 1D expert.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from modus_mega.config import config_to_dict
from modus_mega.convert.__main__ import main
from modus_mega.convert.hf import load_pretrained, open_hf
from modus_mega.convert.keymap import VOCAB_TENSORS
from modus_mega.convert.text_model import ZERO_BIAS, text_model_names
from modus_mega.hf import ModusHFConfig, ModusHFModel
from modus_mega.hf.config import ARCHITECTURE
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from modus_mega.training.loop import train
from modus_mega.vocab import build_vocabulary
from tests.convert.helpers import REPO, random_reference, tiny_config, write_release
from tests.convert.test_roundtrip import forward
from tests.distributed.helpers import run_distributed, run_in_layout
from tests.model.helpers import packed_batch

CAPTIONS = ["a red cube on a blue floor", "two green spheres", "a small yellow cone next to a cube"] * 4
SENTENCE = "a green cube next to two spheres"


def _train_one_step(raw: dict, run_dir: str) -> None:
    def step(cfg, ctx) -> None:
        cfg.training.steps = 1
        train(cfg, ctx)

    run_in_layout(raw, {}, Path(run_dir), step)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BAGEL release with a real (trained) tokenizer."""
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("hf_model") / "bagel"
    write_release(path, cfg, *random_reference(cfg))
    (path / "merges.txt").unlink()  # the helpers' placeholder; the trained tokenizer below is real
    train_tiny_text_tokenizer(CAPTIONS, 300, path)
    return path


@pytest.fixture(scope="module")
def exports(release: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Callable[[], Path]]:
    """``to-hf`` outputs, made when first asked for: of the release imported by ``from-bagel``
    ("release") and of a one-step training run started from the release ("run")."""
    root = tmp_path_factory.mktemp("exports")

    def from_release() -> Path:
        tiny = str(REPO / "configs" / "tiny.json")
        main(["from-bagel", str(release), str(root / "imported"), "--config", tiny, "--quiet"])
        return to_hf(root / "imported", root / "release_hf", "--max-shard-size", "200KB")

    def from_run() -> Path:
        cfg = tiny_config()
        cfg.init.bagel_dir = str(release)
        cfg.data.token_budget, cfg.training.log_every, cfg.training.optim.warmup_steps = 256, 1, 0
        cfg.training.wandb_mode = "disabled"
        run_distributed(_train_one_step, 1, config_to_dict(cfg), str(root / "run"))
        return to_hf(root / "run", root / "run_hf")

    return {"release": functools.cache(from_release), "run": functools.cache(from_run)}


def to_hf(src: Path, out: Path, *flags: str) -> Path:
    """``to-hf src out flags``; returns ``out``."""
    main(["to-hf", str(src), str(out), *flags, "--quiet"])
    return out


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("source", ["release", "run"])
def test_automodel_gives_the_outputs_of_load_pretrained(exports, source: str) -> None:
    hf_dir = exports[source]()
    config = AutoConfig.from_pretrained(hf_dir)
    assert isinstance(config, ModusHFConfig) and config.architectures == [ARCHITECTURE] == [ModusHFModel.__name__]
    hf = AutoModel.from_pretrained(hf_dir, dtype=torch.float32)
    assert isinstance(hf, ModusHFModel) and not hf.training and hf.vae is not None
    model, vae = load_pretrained(hf_dir)
    cfg = tiny_config()
    batch = packed_batch(cfg, build_vocabulary(cfg.model.vocab), num_samples=3, seed=0)
    logits, velocity = forward(cfg, batch, hf, hf.vae)
    expected_logits, expected_velocity = forward(cfg, batch, model, vae)
    assert torch.equal(logits, expected_logits) and torch.equal(velocity, expected_velocity)
    with open_hf(hf_dir) as stored:  # the wrapper's tensors are the checkpoint's, under the same names
        state = _state(hf)
        assert sorted(state) == sorted(stored.names())
        assert all(torch.equal(state[name], stored.read(name)) for name in state)


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_save_pretrained_writes_what_to_hf_writes_and_reloads_bit_for_bit(exports, tmp_path: Path, dtype) -> None:
    written = to_hf(exports["release"](), tmp_path / "to_hf", "--dtype", dtype)
    loaded = AutoModel.from_pretrained(written)
    loaded.save_pretrained(tmp_path / "saved", max_shard_size="200KB")
    config = json.loads((written / "config.json").read_text())
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config
    assert config["dtype"] == ("float32" if dtype == "keep" else "bfloat16")
    ours, theirs = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (written, tmp_path / "saved"))
    assert ours["weight_map"].keys() == theirs["weight_map"].keys()
    assert ours["metadata"]["total_parameters"] == theirs["metadata"]["total_parameters"]
    if dtype == "keep":  # in bf16, transformers keeps the fp32 sin-cos tables fp32 (so the sizes differ)
        assert ours["metadata"] == theirs["metadata"]

    reloaded = AutoModel.from_pretrained(tmp_path / "saved")
    before, after = _state(loaded), _state(reloaded)
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    model, _ = load_pretrained(tmp_path / "saved")  # our own loader reads what transformers wrote
    assert torch.equal(model.lm_head.weight, loaded.lm_head.weight.float())


@pytest.mark.parametrize("source", ["release", "run"])
def test_autotokenizer_loads_the_exported_tokenizer(release: Path, exports, source: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(exports[source]())
    expected = AutoTokenizer.from_pretrained(release).encode(SENTENCE, add_special_tokens=False)
    assert tokenizer.encode(SENTENCE, add_special_tokens=False) == expected and len(expected) > 1
    assert tokenizer.decode(expected) == SENTENCE


def test_text_model_of_a_training_run_holds_its_1d_expert(exports, tmp_path: Path) -> None:
    run_dir = exports["run"]().parent / "run"
    lm = AutoModelForCausalLM.from_pretrained(to_hf(run_dir, tmp_path / "lm", "--text-model", "--text-vocab-only"))
    model, _ = load_pretrained(exports["run"]())
    ours, theirs = model.state_dict(), lm.state_dict()
    names = text_model_names(model.cfg)
    assert sorted(theirs) == sorted(names)
    rows = model.cfg.vocab.text_vocab_size
    for name, source in names.items():
        if source == ZERO_BIAS:
            expected = torch.zeros_like(theirs[name])
        else:
            expected = ours[source][:rows] if source in VOCAB_TENSORS else ours[source]
        assert torch.equal(theirs[name], expected), name


def test_a_checkpoint_missing_a_tensor_is_refused(exports, tmp_path: Path) -> None:
    path = tmp_path / "broken"
    shutil.copytree(exports["release"](), path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"].pop("llm2vae.bias")
    tensors = load_file(shard)
    del tensors["llm2vae.bias"]
    save_file(tensors, shard, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"refusing checkpoint .*'missing_keys': \['llm2vae.bias'\]"):
        AutoModel.from_pretrained(path)


def test_importing_modus_mega_does_not_import_transformers() -> None:
    code = "import sys, modus_mega; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
