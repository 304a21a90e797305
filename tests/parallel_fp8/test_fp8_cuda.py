"""FP8 linears on a GPU (skipped without CUDA; ``scripts/gpu_check.sh`` runs it): the hardware
``torch._scaled_mm`` agrees with torchao's emulation of the same float8 operands.

bf16 activations and weights, as in training; 100 tokens (not a multiple of 16, so the weight
gradient's inner dimension is padded). Bound: 2^-6 of |A| |B| per element, room for the bf16
output rounding (2^-9) and Hopper's fast accumulation in the forward; a wrong scale (by a
factor, or missing the padding) errs by the operands' magnitude.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from modus_mega.config import Float8Config
from modus_mega.parallel.fp8_torchao import to_float8

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(w: Tensor, x: Tensor, g: Tensor, recipe: str, emulate: bool) -> tuple[Tensor, Tensor, Tensor]:
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
    linear.weight.data.copy_(w)
    to_float8(linear, Float8Config(recipe=recipe, emulate=emulate), None)
    x = x.clone().requires_grad_(True)
    y = linear(x)
    y.backward(g)
    return y.float(), x.grad.float(), linear.weight.grad.float()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_scaled_mm_agrees_with_emulation_on_gpu(recipe: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, w, g = (torch.randn(s, generator=gen, device="cuda", dtype=torch.bfloat16) for s in ((100, 256), (512, 256), (100, 512)))
    hardware = _run(w, x, g, recipe, emulate=False)
    emulated = _run(w, x, g, recipe, emulate=True)
    x, w, g = x.float(), w.float(), g.float()
    for name, a, b, (left, right) in zip(("y", "dx", "dw"), hardware, emulated, ((x, w.T), (g, w), (g.T, x))):
        bound = 2**-6 * (left.abs() @ right.abs())
        assert ((a - b).abs() <= bound).all(), f"{recipe} {name}"
