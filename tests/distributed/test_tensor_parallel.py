"""Tensor parallel (Megatron-core layers, gloo, 2 CPU ranks) against the serial model.

One spawn of two ranks builds, in each rank, the serial model and its tp = 2 twin from
the same seed, runs one micro-batch with both 1D (CE) and 2D (MSE) targets through
both, and saves full (gathered) weights, losses and gradients; the tests compare them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.tensor_parallel import (
    apply_tensor_parallel,
    build_linears,
    cross_entropy_fn,
    gather_tensor_parallel,
    init_hooks,
)
from tests.distributed.helpers import run_distributed
from tests.model.helpers import micro_batch_loss, step_inputs

TP = 2


def _worker(raw: dict, out: str) -> None:
    cfg = config_from_dict(raw)
    cfg.model.attention_backend = "reference"
    cfg.model.zero_init_llm2vae = False  # a zero head would hide gradient errors behind it
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        serial = ModusModel(cfg.model)
        init_weights(serial, seed=3, std=0.02)
        tp_model = ModusModel(cfg.model, build_linears(ctx, cfg.model.llm))
        apply_tensor_parallel(tp_model, ctx)
        init_weights(tp_model, seed=3, std=0.02, **init_hooks(ctx))

        inputs = step_inputs(copy.deepcopy(cfg), serial.vocab, num_samples=4, seed=0)
        serial_loss = micro_batch_loss(serial, inputs).loss
        tp_loss = micro_batch_loss(tp_model, inputs, cross_entropy_fn(ctx)).loss
        serial_loss.backward()
        tp_loss.backward()

        params = dict(tp_model.named_parameters())
        result = {
            "num_ce": inputs.targets.ce_index.numel(),
            "num_mse": inputs.targets.mse_index.numel(),
            "serial_loss": serial_loss.item(),
            "tp_loss": tp_loss.item(),
            "serial": {n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in serial.named_parameters()},
            "tp": {
                n: (
                    gather_tensor_parallel(p.detach(), p, ctx),
                    None if p.grad is None else gather_tensor_parallel(p.grad, p, ctx),
                )
                for n, p in params.items()
            },
            "local_shapes": {n: tuple(p.shape) for n, p in params.items()},
        }
        torch.save(result, Path(out) / f"rank{ctx.rank}.pt")
    finally:
        ctx.close()




@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    from tests.conftest import _TINY

    cfg: ModusConfig = copy.deepcopy(_TINY)
    cfg.parallel.tp = TP
    out = tmp_path_factory.mktemp("tp")
    run_distributed(_worker, TP, config_to_dict(cfg), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(TP)]


def test_weights_are_sharded(results: list[dict]) -> None:
    shapes = results[0]["local_shapes"]
    assert shapes["layers.0.experts.0.q_proj.weight"] == (64 // TP, 64)
    assert shapes["layers.0.experts.1.o_proj.weight"] == (64, 64 // TP)
    assert shapes["embed_tokens.weight"][0] * TP == results[0]["tp"]["embed_tokens.weight"][0].shape[0]


def test_init_is_tp_invariant(results: list[dict]) -> None:
    for rank in results:
        assert rank["serial"].keys() == rank["tp"].keys()
        for name, (weight, _) in rank["serial"].items():
            assert torch.equal(rank["tp"][name][0], weight), name


def test_loss_matches_serial_with_1d_and_2d_targets(results: list[dict]) -> None:
    for rank in results:
        assert rank["num_ce"] > 0 and rank["num_mse"] > 0, "the micro-batch must carry both kinds of targets"
        assert rank["tp_loss"] == pytest.approx(rank["serial_loss"], rel=1e-5)


def test_gradients_match_serial(results: list[dict]) -> None:
    for rank in results:
        for name, (_, grad) in rank["serial"].items():
            tp_grad = rank["tp"][name][1]
            if grad is None:
                assert tp_grad is None, name
                continue
            scale = grad.abs().max().clamp_min(1e-12)
            assert (tp_grad - grad).abs().max() <= 1e-4 * scale + 1e-7, name
