"""The planner's tensor-parallel traffic (``plan/timing.py``) against the collectives the model really issues.

Two gloo ranks build the tiny model at tp = 2, plain and sequence parallel, each without and
with full recomputation, and both with the 1D expert frozen (``freeze_1d_expert``, as
``training/engine.py`` applies it), and run one packed micro-batch forward and backward (CE
and MSE targets, a length tp does not divide) while every ``torch.distributed`` collective is
recorded with its tensors (the single-tensor all-gather and reduce-scatter through the names
``parallel/collectives.py`` bound at import). The recorded ring bytes (2 passes per
all-reduce, 1 per all-gather or reduce-scatter; the model leaves out vectors, which cost
latency only) and the number of collectives must equal ``tensor_parallel_traffic`` of the
same micro-batch, pp = 1, fp32.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist

from modus_mega.config import ModusConfig, ParallelConfig, config_from_dict, config_to_dict
from modus_mega.model.init import init_weights
from modus_mega.model.inputs import TOKEN_VAE, TOKEN_VIT
from modus_mega.model.modus import ModusModel
from modus_mega.parallel import collectives as tp_collectives
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.recompute import apply_activation_checkpointing
from modus_mega.parallel.tensor_parallel import apply_tensor_parallel, build_linears, cross_entropy_fn, init_hooks
from modus_mega.plan.layout import Layout
from modus_mega.plan.memory import FP32
from modus_mega.plan.shapes import model_shape
from modus_mega.plan.timing import tensor_parallel_traffic
from modus_mega.plan.workload import MicroBatch
from tests.distributed.helpers import run_distributed
from tests.model.helpers import micro_batch_loss, step_inputs

TP = 2
VARIANTS = [(sp, recompute, False) for sp in (False, True) for recompute in ("none", "full")]
VARIANTS += [(False, "none", True), (True, "none", True)]  # (sequence parallel, recompute, 1D expert frozen)
RING_PASSES = {"all_reduce": 2}  # every other collective recorded here passes over its message once
_RECORDED = [
    (dist, name)
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                 "reduce_scatter_tensor", "reduce_scatter_single", "broadcast")
]  # fmt: skip
_RECORDED += [(tp_collectives, "_all_gather_single"), (tp_collectives, "_reduce_scatter_single")]


@contextlib.contextmanager
def recording(log: list[tuple[str, int, int]]) -> Iterator[None]:
    """Append (collective, bytes and dimensions of its largest tensor) to ``log`` for each one issued inside the block."""
    originals = [(module, name, getattr(module, name)) for module, name in _RECORDED if hasattr(module, name)]

    def recorder(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            largest = max(tensors, key=torch.Tensor.numel)
            log.append((name.strip("_").removesuffix("_single"), largest.numel() * largest.element_size(), largest.dim()))
            return fn(*args, **kwargs)

        return call

    for module, name, fn in originals:
        setattr(module, name, recorder(name, fn))
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def _name(sp: bool, recompute: str, frozen: bool) -> str:
    return f"{'sp' if sp else 'tp'}-{recompute}{'-frozen' if frozen else ''}"


def _worker(raw: dict, out: str) -> None:
    cfg = config_from_dict(raw)
    cfg.model.attention_backend = "reference"
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        inputs = step_inputs(copy.deepcopy(cfg), ModusModel(cfg.model).vocab, num_samples=3, seed=0)
        token_type = inputs.model.token_type
        result: dict[str, Any] = {
            "tokens": token_type.numel(),
            "vit_tokens": int((token_type == TOKEN_VIT).sum()),
            "vae_tokens": int((token_type == TOKEN_VAE).sum()),
            "ce_tokens": inputs.targets.ce_index.numel(),
        }
        for sp, recompute, frozen in VARIANTS:
            variant = dataclasses.replace(ctx, sequence_parallel=sp)
            model_cfg = copy.deepcopy(cfg.model)
            model_cfg.llm.freeze_1d_expert = frozen
            model = ModusModel(model_cfg, build_linears(variant, model_cfg.llm))
            apply_tensor_parallel(model, variant)
            init_weights(model, seed=3, std=0.02, **init_hooks(variant))
            if frozen:
                for layer in model.layers:
                    layer.experts[0].requires_grad_(False)
            apply_activation_checkpointing(model, ParallelConfig(recompute=recompute))
            log: list[tuple[str, int, int]] = []
            with recording(log):
                micro_batch_loss(model, inputs, cross_entropy_fn(variant)).loss.backward()
            result[_name(sp, recompute, frozen)] = log
        if ctx.rank == 0:
            (Path(out) / "collectives.json").write_text(json.dumps(result))
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.conftest import _TINY

    cfg: ModusConfig = copy.deepcopy(_TINY)
    cfg.parallel.tp = TP
    cfg.data.token_budget = 79  # 3 samples: 237 tokens, padded to 238 under SP
    out = tmp_path_factory.mktemp("tp_traffic")
    run_distributed(_worker, TP, config_to_dict(cfg), str(out))
    return json.loads((out / "collectives.json").read_text())


@pytest.mark.parametrize(("sp", "recompute", "frozen"), VARIANTS, ids=[_name(*v) for v in VARIANTS])
def test_planner_counts_the_collectives_the_model_issues(recorded: dict[str, Any], sp: bool, recompute: str, frozen: bool) -> None:
    from tests.conftest import _TINY

    tokens = recorded["tokens"]
    assert tokens % TP and recorded["ce_tokens"] > 0 and recorded["vae_tokens"] > 0
    model_cfg = copy.deepcopy(_TINY.model)
    model_cfg.llm.freeze_1d_expert = frozen
    cell = model_cfg.vae.downsample * model_cfg.latent_patch_size
    mb = MicroBatch(
        tokens=tokens, packing_efficiency=1.0, documents=3.0, attention_pairs=0.0,
        vit_tokens=float(recorded["vit_tokens"]), vit_pairs=0.0,
        vae_images=float(recorded["vae_tokens"]), vae_pixels=cell,  # the images' tokens, counted as one-token images
        ce_tokens=float(recorded["ce_tokens"]), peak_vit_tokens=0.0, peak_vae_images=0.0, peak_ce_tokens=0.0,
    )  # fmt: skip
    layout = Layout(TP, 1, 1, 1, sp, recompute, tokens, 1)  # type: ignore[arg-type]
    want = tensor_parallel_traffic(model_shape(model_cfg), layout, mb, 0, FP32)
    log = recorded[_name(sp, recompute, frozen)]
    ring_bytes = sum(RING_PASSES.get(name, 1) * size for name, size, dim in log if dim > 1)
    assert len(log) == want.collectives
    assert ring_bytes == want.ring_bytes
