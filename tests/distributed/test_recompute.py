"""Activation recomputation (``parallel.recompute``) changes memory, never the math.

- One process: the model built with ``recompute = "full"`` (all layers, and the first one
  only) gives the same loss and gradients as without, on a micro-batch with 1D and 2D
  targets, keeps every parameter name, and saves fewer activation bytes for the backward
  (so a recompute that silently did nothing fails the test).
- Two gloo ranks at tp = 2: the same equality through Megatron's tensor-parallel layers,
  whose collectives rerun in the recomputation.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.model.inputs import StepInputs
from modus_mega.parallel.build import build_model
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.recompute import apply_activation_checkpointing, is_recomputed
from modus_mega.parallel.tensor_parallel import cross_entropy_fn
from tests.distributed.helpers import run_distributed
from tests.model.helpers import micro_batch_loss, step_inputs


def _loss_grads_saved(
    cfg: ModusConfig, ctx: ParallelContext, inputs: StepInputs
) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients by name, and bytes of tensors autograd saved for the backward, of ``cfg``'s model."""
    model = build_model(cfg, ctx)
    saved_bytes = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        saved_bytes += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = micro_batch_loss(model, inputs, cross_entropy_fn(ctx))
    terms.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return terms.loss.item(), grads, saved_bytes


def _with(cfg: ModusConfig, recompute: str, layers: int = 0) -> ModusConfig:
    out = copy.deepcopy(cfg)
    out.parallel.recompute, out.parallel.recompute_layers = recompute, layers
    out.model.zero_init_llm2vae = False  # a zero velocity head would hide gradient differences behind it
    out.model.attention_backend = "reference"
    return out


@pytest.fixture(scope="module")
def serial_runs() -> dict[str, tuple[float, dict[str, torch.Tensor], int]]:
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        probe = build_model(cfg, ctx)
        inputs = step_inputs(copy.deepcopy(cfg), probe.vocab, num_samples=4, seed=0)
        assert inputs.targets.ce_index.numel() and inputs.targets.mse_index.numel(), "the micro-batch needs 1D and 2D targets"
        variants = {"none": ("none", 0), "full": ("full", 0), "first": ("full", 1)}
        return {name: _loss_grads_saved(_with(cfg, *v), ctx, inputs) for name, v in variants.items()}
    finally:
        ctx.close()


@pytest.mark.parametrize("variant", ["full", "first"])
def test_recompute_keeps_loss_and_gradients(serial_runs, variant: str) -> None:
    loss, grads, _ = serial_runs["none"]
    loss_r, grads_r, _ = serial_runs[variant]
    assert loss_r == pytest.approx(loss, rel=1e-6)
    assert grads_r.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_saves_fewer_activations(serial_runs) -> None:
    none, first, full = (serial_runs[k][2] for k in ("none", "first", "full"))
    assert full < first < none, (none, first, full)


def test_apply_keeps_names_and_picks_layers(tiny_config: ModusConfig) -> None:
    from modus_mega.model.modus import ModusModel

    model = ModusModel(tiny_config.model)
    names = [n for n, _ in model.named_parameters()]
    cfg = copy.deepcopy(tiny_config.parallel)
    cfg.recompute, cfg.recompute_layers = "full", 1
    chosen = apply_activation_checkpointing(model, cfg)
    assert chosen == ["layers.0", "vit.encoder.layers.0", "vit.encoder.layers.1"]
    assert [n for n, _ in model.named_parameters()] == names
    assert is_recomputed(model.layers[0]) and not is_recomputed(model.layers[1])
    with pytest.raises(ValueError, match="applied twice"):
        apply_activation_checkpointing(model, cfg)
    restored = copy.deepcopy(model)  # a copy recomputes its own layers, not the original's
    assert restored.layers[0].forward.__self__ is restored.layers[0]


def test_config_rejects_recompute_layers_without_recompute(tiny_config: ModusConfig) -> None:
    raw = config_to_dict(tiny_config)
    raw["parallel"]["recompute_layers"] = 1
    with pytest.raises(ValueError, match="needs parallel.recompute=full"):
        config_from_dict(raw)
    raw["parallel"]["recompute"], raw["parallel"]["recompute_layers"] = "full", 3
    with pytest.raises(ValueError, match="must lie in"):
        config_from_dict(raw)


def _tp_worker(raw: dict, out: str) -> None:
    cfg = config_from_dict(raw)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        probe = build_model(cfg, ctx)
        inputs = step_inputs(copy.deepcopy(cfg), probe.vocab, num_samples=4, seed=0)
        loss, grads, _ = _loss_grads_saved(_with(cfg, "none"), ctx, inputs)
        loss_r, grads_r, _ = _loss_grads_saved(_with(cfg, "full"), ctx, inputs)
        worst = max(float((grads_r[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in grads.items())
        result = {"loss": loss, "loss_recompute": loss_r, "same_names": grads.keys() == grads_r.keys(), "worst": worst}
        (Path(out) / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    finally:
        ctx.close()


def test_recompute_under_tensor_parallel(tmp_path: Path) -> None:
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    cfg.parallel.tp = 2
    run_distributed(_tp_worker, 2, config_to_dict(cfg), str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["loss_recompute"] == pytest.approx(result["loss"], rel=1e-6)
        assert result["same_names"]
        assert result["worst"] < 1e-5, result
