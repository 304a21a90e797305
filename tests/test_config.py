"""Config loading: typed tree, overrides, and errors that name the key, the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modus_mega.config import (
    FIELD_RANGES,
    config_from_dict,
    config_to_dict,
    load_config,
    numeric_field_patterns,
    save_config,
)
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
        (lambda r: r["training"].update(eval_every=-1), "training.eval_every = -1 is out of range"),
        (lambda r: r["training"].update(eval_every=10), "set data.val_shards"),
        (lambda r: r["training"].update(eval_batches=0), "training.eval_batches"),
        (lambda r: r["data"].update(val_shards="held_out"), "data.val_shards"),
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


def test_base_chain_merges_objects_and_replaces_the_rest(tmp_path: Path) -> None:
    """c.json -> sub/b.json -> ../a.json: each file's values over its base's, overrides last."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text(json.dumps(tiny_raw()))
    (tmp_path / "sub" / "b.json").write_text(json.dumps({
        "base": "../a.json",
        "parallel": {"tp": 2},
        "data": {"target_weights": {"depth": 1.0, "rgb": 3.0}},
        "training": {"optim": {"betas": [0.8, 0.9]}, "steps": 5},
    }))  # fmt: skip
    (tmp_path / "sub" / "c.json").write_text(json.dumps({"base": "b.json", "training": {"steps": 7, "seed": 4}}))
    cfg = load_config(tmp_path / "sub" / "c.json", ["training.steps=9"])

    expected = tiny_raw()  # the same run written out in full by hand
    expected["parallel"]["tp"] = 2
    expected["data"]["target_weights"] = {"caption": 1.0, "depth": 1.0, "rgb": 3.0}
    expected["training"].update(steps=9, seed=4)
    expected["training"]["optim"]["betas"] = [0.8, 0.9]  # lists are replaced, not merged
    assert config_to_dict(cfg) == config_to_dict(config_from_dict(expected))
    assert list(cfg.data.target_weights) == ["caption", "depth", "rgb"]  # base's other keys, then the file's


def test_tiny_shards_resolves_to_its_full_form() -> None:
    """configs/tiny_shards.json = tiny.json + its data section, with the target order it always had."""
    raw = tiny_raw()
    raw["data"].update(source="shards", shards="runs/demo/data", val_shards="runs/demo/val",
                       text_tokenizer="runs/demo/text_tokenizer", vq_dir="runs/demo/vq", num_workers=1,
                       max_conditions=3)  # fmt: skip
    raw["data"]["target_weights"] = {
        name: 1.0
        for name in ["rgb", "depth", "normal", "seg", "sam_seg", "canny", "sam_edge", "caption", "detection", "grounding",
                     "dinov2_global", "dinov2_local", "clip_global", "imagebind_global", "imagebind_local"]
    }  # fmt: skip
    raw["training"].update(run_dir="runs/demo", eval_every=50)
    resolved = config_to_dict(load_config(REPO / "configs" / "tiny_shards.json"))
    assert json.dumps(resolved) == json.dumps(config_to_dict(config_from_dict(raw)))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.json")))
def test_saved_config_stands_alone(tmp_path: Path, name: str) -> None:
    """What a run saves (save_config) is the resolved tree: no base left, and it loads to the same config."""
    cfg = load_config(REPO / "configs" / name)
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "base" not in saved
    assert config_to_dict(load_config(tmp_path / "config.json")) == config_to_dict(cfg)


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"run.json": {"base": "nope.json"}}, "nope.json (the base of {tmp}/run.json) does not exist"),
        ({"run.json": {"base": "run.json"}}, "closes a cycle ({tmp}/run.json -> {tmp}/run.json)"),
        ({"run.json": {"base": "sub/a.json"}, "sub/a.json": {"base": "../run.json"}},
         "closes a cycle ({tmp}/run.json -> {tmp}/sub/a.json -> {tmp}/sub/../run.json)"),
        ({"run.json": {"base": ["a.json"]}}, "base = ['a.json'] must be a path relative to the file"),
        ({"run.json": {"base": "a.json"}, "a.json": [1]}, "a.json (the base of {tmp}/run.json) must hold a JSON object"),
        ({"run.json": {"base": "a.json", "trainig": {}}, "a.json": {}}, "{tmp}/run.json (bases: {tmp}/a.json): unknown key 'trainig'"),
    ],
)  # fmt: skip
def test_base_errors_name_the_files(tmp_path: Path, files: dict, message: str) -> None:
    for name, raw in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(raw))
    with pytest.raises(ValueError) as info:
        load_config(tmp_path / "run.json")
    assert message.format(tmp=tmp_path) in str(info.value)


def _invalid_cases() -> list[tuple[str, object]]:
    """(reported key, invalid value) for every numeric field of the tree, from the types and FIELD_RANGES."""
    cases = []
    for pattern, kind in numeric_field_patterns():
        assert pattern in FIELD_RANGES, f"{pattern} has no row in config.FIELD_RANGES: give it its valid range"
        key = pattern.replace("[]", "[0]").replace(".*", ".rgb")
        examples = FIELD_RANGES[pattern].invalid_examples(is_int=kind is int)
        assert examples, f"{pattern}: its range refuses nothing"
        cases += [(key, value) for value in examples]
    return cases


def _set(raw: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    if last.endswith("[0]"):
        node[last[:-3]][0] = value
    else:
        node[last] = value


@pytest.mark.parametrize(("key", "value"), _invalid_cases(), ids=lambda v: str(v))
def test_every_numeric_field_refuses_an_out_of_range_value(key: str, value: object) -> None:
    raw = config_to_dict(load_config(REPO / "configs" / "tiny.json"))
    _set(raw, key, value)
    with pytest.raises(ValueError) as info:
        config_from_dict(raw, source="run.json")
    assert str(info.value).startswith(f"run.json: {key} = "), str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.log_every=0", "training.log_every = 0 is out of range; set it to a value of at least 1"),
        ("training.optim.lr=-0.1", "training.optim.lr = -0.1 is out of range; set it to a value greater than 0"),
        ("training.optim.lr=NaN", "training.optim.lr = nan is out of range"),
        ("training.timesteps.logit_mean=Infinity", "training.timesteps.logit_mean = inf is out of range"),
        ("training.steps=-5", "training.steps = -5 is out of range"),
        ("training.optim.betas=[0.9]", "training.optim.betas = [0.9] must have exactly 2 items"),
        ("training.optim.betas=[1.5, 0.95]", "training.optim.betas[0] = 1.5 is out of range; set it to a value in [0, 1)"),
        ("data.image_size=0", "data.image_size = 0 is out of range"),
        ("training.optim.warmup_steps=-3", "training.optim.warmup_steps = -3 is out of range"),
        ("data.num_samples=0", "data.num_samples = 0 is out of range"),
        ("training.optim.grad_clip=-1", "training.optim.grad_clip = -1.0 is out of range"),
        ('training.run_dir=""', "training.run_dir is empty"),
        ("training.optim.min_lr=1", "training.optim.min_lr: 1.0 exceeds training.optim.lr"),
    ],
)
def test_the_values_of_issue_15_are_refused(tmp_path: Path, override: str, message: str) -> None:
    path = write(tmp_path, tiny_raw())
    with pytest.raises(ValueError) as info:
        load_config(path, [override])
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
