"""torchao FP8 linears (``parallel/fp8_torchao.py``) against fp64 results, within FP8's precision.

The bound. A value v cast with scale s becomes q(v) = round(v s) / s. Round-to-nearest with
p mantissa bits errs by at most u |v| with u = 2^-(p+1) while v s is a normal number, and by
half the subnormal spacing, a / s, below: |q(v) - v| <= e(v) = u |v| + a / s, with
e4m3: p = 3, u = 2^-4, subnormal spacing 2^-9 (a = 2^-10); e5m2: p = 2, u = 2^-3, spacing 2^-16
(a = 2^-17). The correct scale never saturates (|v| s <= the format's max). A product then errs
by |q(x) q(w) - x w| <= e(x) (|w| + e(w)) + |x| e(w), so a matmul A B errs elementwise by at
most e(A) (|B| + e(B)) + |A| e(B), plus fp32 accumulation, bounded by 1e-5 |A| |B|.
The scales the bound uses are recomputed here from the recipe (max / amax over the whole
tensor, or per row along the contraction axis, rounded down to a power of two for rowwise),
so a cast with a wrong scale (saturating, or underflowing into the subnormals) breaks it:
``test_a_wrong_amax_breaks_the_bound`` checks that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torchao.float8.config import Float8LinearConfig, ScalingType

import modus_mega.parallel.fp8_torchao as fp8_torchao
from modus_mega.config import Float8Config
from modus_mega.parallel.fp8_torchao import Float8Linear, to_float8


@dataclass(frozen=True)
class Format:
    """A float8 format's rounding: relative error u of normals, absolute error a (scaled units) of subnormals."""

    u: float
    a: float
    max: float


E4M3 = Format(u=2**-4, a=2**-10, max=448.0)
E5M2 = Format(u=2**-3, a=2**-17, max=57344.0)


@dataclass(frozen=True)
class Gemm:
    """How one matmul of a recipe casts its operands: None = high precision, else (format, rowwise)."""

    a: tuple[Format, bool] | None
    b: tuple[Format, bool] | None


# recipe -> (output = x W^T, grad_input = g W, grad_weight = g^T x), power-of-2 scales; written from
# torchao's recipe descriptions (Float8LinearRecipeName), not read from its config objects.
RECIPES = {
    "tensorwise": (
        (Gemm((E4M3, False), (E4M3, False)), Gemm((E5M2, False), (E4M3, False)), Gemm((E5M2, False), (E4M3, False))),
        False,
    ),
    "rowwise": ((Gemm((E4M3, True), (E4M3, True)), Gemm((E4M3, True), (E4M3, True)), Gemm((E4M3, True), (E4M3, True))), True),
    "rowwise_with_gw_hp": ((Gemm((E4M3, True), (E4M3, True)), Gemm((E4M3, True), (E4M3, False)), Gemm(None, None)), True),
}


def _scale(t: Tensor, fmt: Format, rowwise: bool, dim: int, pow2: bool) -> Tensor:
    """The correct scale of t (fp64): max / amax over all of t, or over ``dim`` (the contraction axis)."""
    amax = t.abs().amax(dim, keepdim=True) if rowwise else t.abs().amax()
    s = fmt.max / amax.double().clamp_min(1e-12)
    return torch.exp2(torch.floor(torch.log2(s))) if pow2 else s


def _error(t: Tensor, cast: tuple[Format, bool] | None, dim: int, pow2: bool) -> Tensor:
    """e(t): the elementwise bound on |q(t) - t| (0 for a high-precision operand)."""
    if cast is None:
        return torch.zeros_like(t)
    fmt, rowwise = cast
    return fmt.u * t.abs() + fmt.a / _scale(t, fmt, rowwise, dim, pow2)


def _bound(a: Tensor, b: Tensor, gemm: Gemm, pow2: bool) -> Tensor:
    """Elementwise bound on |fp8(a @ b) - a @ b| for a [r, c], b [c, s] (module docstring)."""
    a, b = a.double(), b.double()
    ea, eb = _error(a, gemm.a, 1, pow2), _error(b, gemm.b, 0, pow2)
    return ea @ (b.abs() + eb) + a.abs() @ eb + 1e-5 * a.abs() @ b.abs()


def _fp8_linear(weight: Tensor, recipe: str, emulate: bool = True) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    to_float8(linear, Float8Config(recipe=recipe, emulate=emulate), None)
    return linear


def _run(linear: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y, dL/dx, dL/dW) of L = sum(y * g)."""
    x = x.clone().requires_grad_(True)
    y = linear(x)
    y.backward(g)
    return y.detach(), x.grad, linear.weight.grad


def _check_within_bound(recipe: str, x: Tensor, w: Tensor, g: Tensor, emulate: bool = True) -> None:
    (out, grad_in, grad_w), pow2 = RECIPES[recipe]
    y, dx, dw = _run(_fp8_linear(w, recipe, emulate), x, g)
    x64, w64, g64 = x.double(), w.double(), g.double()
    for name, got, exact, bound in (
        ("output", y, x64 @ w64.T, _bound(x, w.T, out, pow2)),
        ("grad_input", dx, g64 @ w64, _bound(g, w, grad_in, pow2)),
        ("grad_weight", dw, g64.T @ x64, _bound(g.T, x, grad_w, pow2)),
    ):
        excess = ((got.double() - exact).abs() - bound).max().item()
        assert excess <= 0, f"{recipe} {name}: error exceeds the FP8 bound by {excess:.3g}"


def _data(positive: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """x [20, 48], W [32, 48], g [20, 32]; 20 tokens (not a multiple of 16) exercises the padding."""
    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(shape, generator=gen) for shape in ((20, 48), (32, 48), (20, 32)))
    x[3] *= 20  # an outlier token: rowwise and tensorwise scales differ
    if positive:  # every error of a saturated or underflowed cast then has one sign and adds up
        x, w, g = x.abs() + 0.1, w.abs() + 0.1, g.abs() + 0.1
    return x, w, g


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("emulate", [True, False], ids=["emulated", "scaled_mm"])
def test_outputs_and_gradients_within_the_fp8_bound(recipe: str, emulate: bool) -> None:
    _check_within_bound(recipe, *_data(), emulate=emulate)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("factor", [0.25, 1e5], ids=["saturating", "underflowing"])
def test_a_wrong_amax_breaks_the_bound(recipe: str, factor: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound test can fail: the same check with every amax off by ``factor`` does."""
    data = _data(positive=True)
    _check_within_bound(recipe, *data)
    true_amax = fp8_torchao._amax
    monkeypatch.setattr(fp8_torchao, "_amax", lambda *args: true_amax(*args) * factor)
    with pytest.raises(AssertionError, match="exceeds the FP8 bound"):
        _check_within_bound(recipe, *data)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_emulated_and_scaled_mm_agree(recipe: str) -> None:
    """torchao's two matmuls of the same float8 operands agree to the output's rounding.

    Tensorwise outputs fp32 either way (1e-6); torchao's rowwise ``_scaled_mm`` returns bf16 and
    casts back (2^-8 of |x| |W|).
    """
    x, w, g = _data()
    emulated = _run(_fp8_linear(w, recipe, emulate=True), x, g)
    scaled_mm = _run(_fp8_linear(w, recipe, emulate=False), x, g)
    rel = 1e-6 if recipe == "tensorwise" else 2**-8
    for a, b, (left, right) in zip(emulated, scaled_mm, ((x, w.T), (g, w), (g.T, x))):
        tol = rel * (left.abs() @ right.abs())
        assert ((a - b).abs() <= tol).all()


def test_fp8_differs_from_fp32() -> None:
    """The linear really quantises: its output is not the fp32 product (else every bound test is vacuous)."""
    x, w, g = _data()
    y, _, _ = _run(_fp8_linear(w, "tensorwise"), x, g)
    assert (y - x @ w.T).abs().max() > 1e-3 * (x @ w.T).abs().max()


def test_bias_and_bf16() -> None:
    """The bias is added in high precision, and bf16 inputs give bf16 outputs within bf16 + FP8 error."""
    x, w, _ = _data()
    linear = nn.Linear(48, 32).to(torch.bfloat16)
    linear.weight.data.copy_(w)
    bias = linear.bias.detach().clone()
    to_float8(linear, Float8Config(), None)
    assert isinstance(linear, Float8Linear)
    y = linear(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    exact = x.double() @ w.double().T + bias.double()
    bound = _bound(x, w.T, RECIPES["tensorwise"][0][0], False) + 2**-8 * exact.abs()  # + bf16 rounding of the output
    assert ((y.double() - exact).abs() <= bound).all()


def test_an_expert_without_tokens() -> None:
    """Zero tokens (an expert the micro-batch routes nothing to) give [0, m] and a zero weight gradient."""
    _, w, _ = _data()
    linear = _fp8_linear(w, "tensorwise")
    y, dx, dw = _run(linear, torch.zeros(0, 48), torch.zeros(0, 32))
    assert y.shape == (0, 32) and dx.shape == (0, 48)
    assert torch.equal(dw, torch.zeros_like(w))


def test_unknown_linear_is_refused() -> None:
    class Other(nn.Linear):
        pass

    with pytest.raises(ValueError, match="cannot convert a Other"):
        to_float8(Other(4, 4), Float8Config(), None)


def test_bound_constants() -> None:
    """The formats' constants are torch's: max values, and u from the mantissa width."""
    assert E4M3.max == torch.finfo(torch.float8_e4m3fn).max and E5M2.max == torch.finfo(torch.float8_e5m2).max
    assert E4M3.u == torch.finfo(torch.float8_e4m3fn).eps / 2 and E5M2.u == torch.finfo(torch.float8_e5m2).eps / 2
    assert E4M3.a == torch.finfo(torch.float8_e4m3fn).smallest_normal * 2**-4 and math.isclose(
        E5M2.a, torch.finfo(torch.float8_e5m2).smallest_normal * 2**-3
    )


# The module docstring's table: (recipe, split) -> the (gemm, operand) casts whose amax is reduced over tp.
OPERANDS = {  # (gemm, operand) -> (axes, contraction, cast config attribute)
    ("output", "x"): ("nk", "k", "cast_config_input"),
    ("output", "W"): ("km", "k", "cast_config_weight"),
    ("grad_input", "g"): ("nm", "m", "cast_config_grad_output"),
    ("grad_input", "W"): ("mk", "m", "cast_config_weight_for_grad_input"),
    ("grad_weight", "g"): ("mn", "n", "cast_config_grad_output_for_grad_weight"),
    ("grad_weight", "x"): ("nk", "n", "cast_config_input_for_grad_weight"),
}
REDUCED = {
    ("tensorwise", "m"): {("output", "W"), ("grad_input", "g"), ("grad_input", "W"), ("grad_weight", "g")},
    ("tensorwise", "k"): {("output", "x"), ("output", "W"), ("grad_input", "W"), ("grad_weight", "x")},
    ("rowwise", "m"): {("grad_input", "g"), ("grad_input", "W")},
    ("rowwise", "k"): {("output", "x"), ("output", "W")},
    ("rowwise_with_gw_hp", "m"): {("grad_input", "g"), ("grad_input", "W")},  # its W for grad_input is tensorwise: spans m
    ("rowwise_with_gw_hp", "k"): {("output", "x"), ("output", "W"), ("grad_input", "W")},  # ... and k
}


@pytest.mark.parametrize("recipe, split", sorted(REDUCED))
def test_amax_reductions_follow_the_table(recipe: str, split: str) -> None:
    config = Float8LinearConfig.from_recipe_name(recipe)
    reduced = {
        key for key, (axes, contraction, attr) in OPERANDS.items()
        if getattr(config, attr).scaling_type is not ScalingType.DISABLED
        and fp8_torchao.amax_spans_split(getattr(config, attr), axes, contraction, split)
    }  # fmt: skip
    assert reduced == REDUCED[recipe, split]
    assert not any(fp8_torchao.amax_spans_split(getattr(config, a), x, c, None) for x, c, a in OPERANDS.values())
