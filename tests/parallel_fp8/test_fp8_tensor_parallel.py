"""FP8 at tp = 2 equals FP8 at tp = 1 (gloo, 2 CPU ranks): the scales do not depend on the layout.

One spawn of two ranks runs, in each rank:

- single linears, for every recipe: the serial FP8 linear on full x [20, 48], W [32, 48] and
  output gradient g [20, 32], and its column- and row-parallel FP8 twins on this rank's slices.
  The data makes every slice's amax differ from the whole tensor's (a shard scaled by 10), so a
  scale computed from the local slice alone would quantise other values; the control twins,
  converted without the tp group, must differ by that much.
- the tiny model in FP8, serial and at tp = 2 (plain tensor parallel; sequence parallel with full
  recomputation, whose regathered and recomputed linear inputs are cast again), with a non-zero
  o_proj bias: loss and full gradients.

The bound for "equal": fp32 summation order, 1e-5 of |A| |B| per matmul element for the
linears; for the model, the same 1e-4 of the largest gradient as the fp32 tensor-parallel test.
The linears multiply emulated (fp32 outputs): torchao's rowwise ``_scaled_mm`` rounds an fp32
output to bf16, so row-parallel partial sums would differ by bf16 rounding, which says nothing
about the scales; ``test_fp8_linear.py`` checks that the two matmuls agree.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from modus_mega.config import Float8Config, ModusConfig, ParallelConfig, config_from_dict, config_to_dict
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.fp8 import apply_float8
from modus_mega.parallel.fp8_torchao import to_float8
from modus_mega.parallel.recompute import apply_activation_checkpointing
from modus_mega.parallel.tensor_parallel import (
    TensorParallelColumnLinear,
    TensorParallelRowLinear,
    apply_tensor_parallel,
    build_linears,
    cross_entropy_fn,
    gather_tensor_parallel,
    init_hooks,
    megatron_config,
)
from tests.distributed.helpers import run_distributed
from tests.model.helpers import micro_batch_loss, step_inputs

TP = 2
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
TWINS = ("tensor_parallel", "sequence_parallel_recompute")


# ----------------------------------------------------------------------------- single linears


def _data() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(shape, generator=gen) for shape in ((20, 48), (32, 48), (20, 32)))
    x[:, 24:] *= 10  # the second k shard: row-parallel x and W slices have other amaxes than the whole
    w[16:] *= 10  # the second m shard: column-parallel W slices
    w[:, 24:] *= 3
    g[:, 16:] *= 10  # the second m shard: column-parallel g slices
    return x, w, g


def _run(linear: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x = x.clone().requires_grad_(True)
    y = linear(x)
    y.backward(g)
    return y.detach(), x.grad, linear.weight.grad


def _excess(got: Tensor, want: Tensor, scale: Tensor) -> float:
    """max(|got - want| / scale): 1 means at the fp32 summation-order bound."""
    return ((got - want).abs() / scale).max().item()


def _linears(ctx: ParallelContext, recipe: str, with_group: bool) -> dict[str, float]:
    """Relative differences of the column- and row-parallel FP8 linears to the serial one."""
    cfg = Float8Config(recipe=recipe, emulate=True)
    group = ctx.tp_group if with_group else None
    x, w, g = _data()
    serial = nn.Linear(48, 32, bias=False)
    serial.weight.data.copy_(w)
    to_float8(serial, cfg, None)
    y, dx, dw = _run(serial, x, g)
    tol = {  # 1e-5 |A| |B| for each matmul
        "y": 1e-5 * x.abs() @ w.abs().T, "dx": 1e-5 * g.abs() @ w.abs(), "dw": 1e-5 * g.abs().T @ x.abs(),
    }  # fmt: skip
    m, k = slice(16 * ctx.tp_rank, 16 * (ctx.tp_rank + 1)), slice(24 * ctx.tp_rank, 24 * (ctx.tp_rank + 1))
    config = megatron_config(ctx)

    column = TensorParallelColumnLinear(48, 32, False, config=config, ctx=ctx)
    column.weight.data.copy_(w[m])
    to_float8(column, cfg, group)
    cy, cdx, cdw = _run(column, x, g[:, m])
    dist.all_reduce(cdx, group=ctx.tp_group)  # the input gradient's partial sums

    row = TensorParallelRowLinear(48, 32, False, config=config, ctx=ctx)
    row.weight.data.copy_(w[:, k])
    to_float8(row, cfg, group)
    ry, rdx, rdw = _run(row, x[:, k], g)
    dist.all_reduce(ry, group=ctx.tp_group)  # the output's partial sums

    return {
        "column y": _excess(cy, y[:, m], tol["y"][:, m]),
        "column dx": _excess(cdx, dx, tol["dx"]),
        "column dw": _excess(cdw, dw[m], tol["dw"][m]),
        "row y": _excess(ry, y, tol["y"]),
        "row dx": _excess(rdx, dx[:, k], tol["dx"][:, k]),
        "row dw": _excess(rdw, dw[:, k], tol["dw"][:, k]),
    }


# ----------------------------------------------------------------------------- the tiny model


def _set_o_bias(model: ModusModel) -> None:
    """The same non-zero o_proj biases in every model (init makes biases zero)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("o_proj.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _model(cfg: ModusConfig, ctx: ParallelContext, twin: str | None) -> ModusModel:
    """The FP8 model: serial (``twin`` None) or the tp = 2 ``twin``, built in the engine's order."""
    if twin is None:
        model = ModusModel(cfg.model)
        apply_float8(model, cfg.training, ctx)
        init_weights(model, seed=3, std=0.02)
    else:
        ctx = dataclasses.replace(ctx, sequence_parallel=twin != "tensor_parallel")
        model = ModusModel(cfg.model, build_linears(ctx, cfg.model.llm))
        apply_tensor_parallel(model, ctx)
        apply_float8(model, cfg.training, ctx)
        init_weights(model, seed=3, std=0.02, **init_hooks(ctx))
        if twin == "sequence_parallel_recompute":
            apply_activation_checkpointing(model, ParallelConfig(recompute="full"))
    _set_o_bias(model)
    return model


def _grads(model: ModusModel, ctx: ParallelContext) -> dict[str, Tensor]:
    return {n: gather_tensor_parallel(p.grad, p, ctx) for n, p in model.named_parameters() if p.grad is not None}


def _worker(raw: dict, out: str) -> None:
    cfg = config_from_dict(raw)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        result = {
            "linears": {recipe: _linears(ctx, recipe, with_group=True) for recipe in RECIPES},
            "without_group": {"tensorwise": _linears(ctx, "tensorwise", with_group=False)},
        }
        serial = _model(cfg, ctx, None)
        inputs = step_inputs(copy.deepcopy(cfg), serial.vocab, num_samples=2, seed=0)
        loss = micro_batch_loss(serial, inputs).loss
        loss.backward()
        result["serial"] = (loss.item(), _grads(serial, ctx))
        # A checkpoint of the FP8 model loads into the bf16/fp32 one and back (Megatron's _extra_state included).
        plain = ModusModel(cfg.model, build_linears(ctx, cfg.model.llm))
        fp8 = _model(cfg, ctx, "tensor_parallel")
        plain.load_state_dict(fp8.state_dict())
        fp8.load_state_dict(plain.state_dict())
        result["state_dict_keys"] = (list(plain.state_dict()), list(fp8.state_dict()))
        for twin in TWINS:
            model = _model(cfg, ctx, twin)
            loss = micro_batch_loss(model, inputs, cross_entropy_fn(ctx)).loss
            loss.backward()
            result[twin] = (loss.item(), _grads(model, ctx))
        torch.save(result, Path(out) / f"rank{ctx.rank}.pt")
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    from tests.conftest import _TINY

    cfg: ModusConfig = copy.deepcopy(_TINY)
    cfg.parallel.tp = TP
    cfg.training.precision = "fp8"
    cfg.model.attention_backend = "reference"
    cfg.model.zero_init_llm2vae = False  # a zero head would hide gradient errors behind it
    out = tmp_path_factory.mktemp("fp8_tp")
    run_distributed(_worker, TP, config_to_dict(cfg), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(TP)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_parallel_linears_equal_the_serial_one(results: list[dict], recipe: str) -> None:
    for rank in results:
        for name, excess in rank["linears"][recipe].items():
            assert excess <= 1, f"{recipe} {name}: {excess:.3g} x the summation-order bound"


def test_local_amax_would_change_the_result(results: list[dict]) -> None:
    """The control: without the tp amax reduction, tensorwise slices quantise differently.

    (Rowwise scales are powers of two, which change only values in FP8's subnormal range; that
    recipe's reductions are checked against the table in ``test_fp8_linear.py``.)
    """
    names = results[0]["without_group"]["tensorwise"]
    worst = {name: max(rank["without_group"]["tensorwise"][name] for rank in results) for name in names}
    assert all(excess > 100 for excess in worst.values()), worst  # the slice with the smaller amax differs


def test_checkpoint_keys_are_the_same_in_fp8(results: list[dict]) -> None:
    """At tp = 2 too (Megatron's linears carry ``_extra_state``): strict loads both ways ran in the worker."""
    plain, fp8 = results[0]["state_dict_keys"]
    assert plain == fp8 and any(key.endswith("q_proj._extra_state") for key in fp8)


@pytest.mark.parametrize("twin", TWINS)
def test_tp2_model_equals_tp1_in_fp8(results: list[dict], twin: str) -> None:
    for rank in results:
        serial_loss, serial_grads = rank["serial"]
        loss, grads = rank[twin]
        assert loss == pytest.approx(serial_loss, rel=1e-5)
        assert grads.keys() == serial_grads.keys()
        for name, grad in serial_grads.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert (grads[name] - grad).abs().max() <= 1e-4 * scale + 1e-7, f"{twin} {name}"
