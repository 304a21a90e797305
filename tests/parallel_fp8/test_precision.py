"""``training.precision``: the config fields, ``compute_dtype`` and ``apply_float8`` on the tiny model (tp = 1)."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import pytest
import torch
from torch import nn

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.build import build_model
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.fp8 import FLOAT8_LINEARS, apply_float8, compute_dtype, float8_autocast
from modus_mega.parallel.fp8_torchao import Float8Linear
from tests.model.helpers import micro_batch_loss, step_inputs


@pytest.fixture(scope="module")
def ctx() -> Iterator[ParallelContext]:
    from tests.conftest import _TINY

    ctx = ParallelContext.initialize(copy.deepcopy(_TINY.parallel))
    yield ctx
    ctx.close()


@pytest.mark.parametrize(
    "precision, device, dtype",
    [
        ("auto", "cpu", torch.float32),  # today's CPU behaviour: tiny losses stay bit-identical
        ("auto", "cuda", torch.bfloat16),
        ("fp32", "cuda", torch.float32),
        ("bf16", "cpu", torch.bfloat16),
        ("fp8", "cpu", torch.bfloat16),
        ("fp8", "cuda", torch.bfloat16),
    ],
)
def test_compute_dtype(precision: str, device: str, dtype: torch.dtype) -> None:
    assert compute_dtype(precision, torch.device(device)) == dtype


def test_compute_dtype_refuses_an_unknown_precision() -> None:
    with pytest.raises(ValueError, match="training.precision='fp16'"):
        compute_dtype("fp16", torch.device("cpu"))


def test_config_defaults_and_validation(tiny_config: ModusConfig) -> None:
    assert tiny_config.training.precision == "auto" and tiny_config.training.fp8.recipe == "tensorwise"
    raw = config_to_dict(tiny_config)
    raw["training"]["precision"] = "fp8"
    raw["training"]["fp8"] = {"recipe": "rowwise", "emulate": True}
    cfg = config_from_dict(raw)
    assert (cfg.training.precision, cfg.training.fp8.recipe, cfg.training.fp8.emulate) == ("fp8", "rowwise", True)
    for key, value, message in (
        ("precision", "fp16", "training.precision = 'fp16' is not one of"),
        ("fp8", {"recipe": "blockwise"}, "training.fp8.recipe = 'blockwise' is not one of"),
        ("fp8", {"amax_history_len": 0}, "training.fp8.amax_history_len = 0 is out of range"),
    ):
        bad = copy.deepcopy(raw)
        bad["training"][key] = value
        with pytest.raises(ValueError, match=message):
            config_from_dict(bad)
    bad = copy.deepcopy(raw)
    bad["parallel"]["tp_backend"] = "te"
    with pytest.raises(ValueError, match="training.fp8.emulate: is torchao's option"):
        config_from_dict(bad)


def test_apply_float8_converts_exactly_the_mot_linears(tiny_config: ModusConfig, ctx: ParallelContext) -> None:
    model = ModusModel(tiny_config.model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    other_linears = {n for n, m in model.named_modules() if type(m) is nn.Linear and ".experts." not in n}
    assert apply_float8(model, tiny_config.training, ctx) == []  # precision auto: nothing

    tiny_config.training.precision = "fp8"
    names = apply_float8(model, tiny_config.training, ctx)
    num_layers = tiny_config.model.llm.num_layers
    assert len(names) == num_layers * 2 * len(FLOAT8_LINEARS)
    assert "layers.0.experts.1.mlp.down_proj" in names and "layers.0.experts.0.q_proj" in names
    assert {n for n, m in model.named_modules() if isinstance(m, Float8Linear)} == set(names)
    assert other_linears and all(type(model.get_submodule(n)) is nn.Linear for n in other_linears)  # heads, vae2llm, ViT
    assert all(params[n] is p for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys  # checkpoints are the same in every precision


def test_fp8_model_trains_close_to_fp32(tiny_config: ModusConfig, ctx: ParallelContext) -> None:
    """The tiny model's loss and gradients in FP8 (fp32 elsewhere) are near fp32's, and not equal to them."""
    tiny_config.model.attention_backend = "reference"
    tiny_config.model.zero_init_llm2vae = False
    fp32 = ModusModel(tiny_config.model)
    init_weights(fp32, seed=3, std=0.02)
    fp8 = copy.deepcopy(fp32)
    tiny_config.training.precision = "fp8"
    apply_float8(fp8, tiny_config.training, ctx)
    inputs = step_inputs(copy.deepcopy(tiny_config), fp32.vocab, num_samples=2, seed=0)
    loss32, loss8 = micro_batch_loss(fp32, inputs).loss, micro_batch_loss(fp8, inputs).loss
    loss32.backward()
    loss8.backward()
    assert loss8.item() != loss32.item()
    assert loss8.item() == pytest.approx(loss32.item(), rel=2e-2)
    w32 = fp32.layers[0].experts[1].mlp.up_proj.weight.grad
    w8 = fp8.layers[0].experts[1].mlp.up_proj.weight.grad
    assert torch.nn.functional.cosine_similarity(w32.flatten(), w8.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_low_precision_runs_on_cpu_near_fp32(precision: str, tiny_config: ModusConfig, ctx: ParallelContext) -> None:
    """bf16 (and FP8 over bf16) on CPU: the tiny model in ``compute_dtype`` gives the fp32 loss within 2%."""
    tiny_config.model.attention_backend = "reference"
    fp32 = ModusModel(tiny_config.model)
    init_weights(fp32, seed=3, std=0.02)
    dtype = compute_dtype(precision, torch.device("cpu"))
    low = copy.deepcopy(fp32)
    tiny_config.training.precision = precision
    apply_float8(low, tiny_config.training, ctx)
    low.to(dtype)
    inputs = step_inputs(copy.deepcopy(tiny_config), fp32.vocab, num_samples=2, seed=0)
    loss32 = micro_batch_loss(fp32, inputs).loss
    inputs.model.vit_patches = inputs.model.vit_patches.to(dtype)  # what the engine casts
    inputs.model.vae_tokens = inputs.model.vae_tokens.to(dtype)
    loss = micro_batch_loss(low, inputs).loss
    loss.backward()
    assert loss.dtype == torch.float32  # the loss is taken in fp32
    assert loss.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert low.layers[0].experts[0].q_proj.weight.grad.dtype == dtype


def test_float8_autocast_is_a_no_op_off_te(tiny_config: ModusConfig, ctx: ParallelContext) -> None:
    tiny_config.training.precision = "fp8"
    assert isinstance(float8_autocast(tiny_config.training, "local", ctx), contextlib.nullcontext)


def test_build_model_converts_before_init(tiny_config: ModusConfig, ctx: ParallelContext) -> None:
    """``build_model`` in FP8: the MoT linears compute in FP8 and init-by-name filled them as in the default build."""
    plain = build_model(tiny_config, ctx)
    tiny_config.training.precision = "fp8"
    fp8 = build_model(tiny_config, ctx)
    converted = {n for n, m in fp8.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == tiny_config.model.llm.num_layers * 2 * len(FLOAT8_LINEARS)
    want = plain.state_dict()
    for name, tensor in fp8.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    assert list(want) == list(fp8.state_dict())
