"""Model states of the real DeepSpeed engine, per rank, against the memory model: exact bytes.

Gloo ranks build the tiny model through ``training/engine.py`` at each ZeRO stage and
layout (tp1 dp2, tp2 dp1, tp2 dp2; with pipelines pp2, tp2 x pp2 and pp2 x dp2), run two
micro-batches of one optimizer step and measure, on every rank, the bytes of every
tensor storage the engine holds, found by a walk over the DeepSpeed engine's object
graph (module parameters with their ``.grad`` and ZeRO-3 ``ds_tensor``, the ZeRO
optimizer's buffers, the wrapped AdamW's state):

- weights (after the step): the module's parameter storages (ZeRO 1/2: the padded flat
  buffer they are views of; ZeRO 3: the partitions and the persistent whole tensors),
  and the frozen VAE, which is not part of the engine;
- master weights (after the step): the tensors AdamW steps that are not module storages;
- optimizer states (after the step): the AdamW's state (exp_avg, exp_avg_sq, step);
- EMA (``parallel/ema.py``, which the engine holds beside DeepSpeed): its fp32 shadow
  tensors, except for bf16 without ZeRO at pp = 1, where the EMA has no fp32 master to average;
- reduce buckets: ZeRO's ``ipg_buckets`` (DeepSpeed's name for them);
- pipe buffers (pp > 1): what the ``PipelineEngine`` keeps in its ``pipe_buffers``, receive
  and gradient buffers, by role (``plan.memory.PipeBuffers``), after every instruction it
  runs; they belong to the activation side of the model and are checked apart;
- gradients (after each backward, and with pp > 1 after the ``ReduceGrads`` instruction,
  where the pipeline reduces): every other storage the engine holds, so a buffer the
  memory model does not know about shows up as a gradient mismatch. Only scalars (0-dim
  tensors and one-element flags: the gradient norm, ZeRO 3's overflow flag, the pipeline's
  losses) are set aside.

Each rank is checked against the model of its own pipeline stage (stage = rank //
(tp dp), the rank order of ``plan.layout.Layout``): the first stage holds the embeddings,
ViT and 2D input modules, the last the final norms and heads, each its half of the
decoder layers. With pp > 1 the ranks run two optimizer steps and are measured in the
second, when the engine's receive buffers exist and every pipe buffer holds a micro-batch;
every micro-batch of a step is the same packed one (the first of the rank with both CE and
MSE targets, noised anew), so that every pipe buffer holds tensors of the same size.

``FP32`` is checked on the engine exactly as CPU training builds it. ``MIXED_BF16`` is
checked on the configuration GPU training generates (``deepspeed_config`` with bf16 on,
which DeepSpeed runs on CPU too), with AdamW's step counters counted because here they
live in the memory of the training device. The ViT width is odd (33) so that ZeRO's
alignment padding and ZeRO 3's per-tensor padding show up in the bytes.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from megatron.core import parallel_state

from modus_mega.config import config_from_dict, config_to_dict
from modus_mega.data.documents import IGNORE_LABEL
from modus_mega.data.loader import PackedLoader
from modus_mega.losses import modus_loss
from modus_mega.model.modus import ModusModel
from modus_mega.parallel.build import build_model, build_vae
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.ema import EmaWeights
from modus_mega.parallel.pipeline import PipelineStage, stage_micro_batch
from modus_mega.parallel.tensor_parallel import cross_entropy_fn
from modus_mega.plan.layout import Layout
from modus_mega.plan.memory import (
    FP32,
    MIXED_BF16,
    DeepSpeedSettings,
    MicroBatchTensors,
    Precision,
    bf16_pipeline_optimizer,
    flat_numel,
    model_states,
    pipeline_buffers,
    reduce_buckets,
    zero12_gradient_elements,
    zero_elements,
)
from modus_mega.plan.shapes import ModelShape, model_shape
from modus_mega.training.engine import build_engine, deepspeed_config
from modus_mega.training.failures import NonFiniteGuard, SkippableAdamW
from modus_mega.training.loop import micro_batch_generator
from modus_mega.training.prepare import prepare_step_inputs
from modus_mega.training.step import StepLoss, loss_scale
from tests.distributed.helpers import run_distributed

ACCUMULATION = 2  # one micro-batch before the accumulation boundary, one at it
PIPELINE_STEPS = 2  # with pp > 1 the second step is measured (module docstring)
EMA_DECAY = 0.5  # any decay: the EMA's bytes are what is checked
SCALAR_BYTES = 8  # the most an engine scalar (the global norm, ZeRO 3's overflow flag) may hold
TWO_RANKS = [
    *({"tp": 1, "pp": 1, "zero": z, "bf16": False} for z in range(4)),
    *({"tp": 2, "pp": 1, "zero": z, "bf16": False} for z in range(4)),
    *({"tp": 1, "pp": 1, "zero": z, "bf16": True} for z in range(4)),
    *({"tp": 1, "pp": 2, "zero": z, "bf16": bf16} for bf16 in (False, True) for z in range(2)),  # ZeRO 2/3 refuse pp
]
FOUR_RANKS = [
    *({"tp": 2, "pp": 1, "zero": z, "bf16": False} for z in range(4)),
    {"tp": 2, "pp": 2, "zero": 1, "bf16": False},
    {"tp": 1, "pp": 2, "zero": 1, "bf16": False},  # dp 2: each stage's flat buffer cut in two
]


def _name(layout: dict[str, Any], world_size: int) -> str:
    dtype = "bf16" if layout["bf16"] else "fp32"
    tp, pp = layout["tp"], layout["pp"]
    return f"tp{tp}-pp{pp}-dp{world_size // (tp * pp)}-zero{layout['zero']}-{dtype}"


# ---------------------------------------------------------------- measurement (in each rank)


Storages = dict[int, tuple[int, str, bool]]  # data_ptr -> (bytes, a path to it, held by a scalar)


def _storages(root: Any) -> Storages:
    """Every tensor storage reachable from ``root`` through DeepSpeed / torch / project objects."""
    found: Storages = {}
    seen: set[int] = set()
    queue: collections.deque[tuple[Any, str]] = collections.deque([(root, "engine")])
    leaves = (int, float, str, bool, type(None), torch.dtype, torch.device, type)
    while queue:
        obj, path = queue.popleft()
        if id(obj) in seen or isinstance(obj, leaves):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if obj.device.type != "meta" and storage.nbytes():
                scalar = obj.numel() == 1 and (obj.dim() == 0 or not obj.is_floating_point())  # a number or a flag
                found.setdefault(storage.data_ptr(), (storage.nbytes(), path, scalar))
            grad = obj.grad if obj.is_leaf else None  # a pipeline's outputs are not leaves: no .grad
            queue.extend([(grad, f"{path}.grad"), (getattr(obj, "ds_tensor", None), f"{path}.ds_tensor")])
        elif isinstance(obj, torch.nn.Module):
            if type(obj).__module__.startswith("deepspeed"):  # the engine: its optimizer and bookkeeping
                queue.extend((v, f"{path}.{k}") for k, v in vars(obj).items() if k not in ("_modules", "_parameters", "_buffers"))
            queue.extend((p, f"{path}.{n}") for n, p in obj.named_parameters(recurse=False))
            queue.extend((b, f"{path}.{n}") for n, b in obj.named_buffers(recurse=False))
            queue.extend((m, f"{path}.{n}") for n, m in obj.named_children())
        elif isinstance(obj, dict):
            queue.extend((k, f"{path}<key>") for k in obj if isinstance(k, torch.Tensor))
            queue.extend((v, f"{path}[{k if isinstance(k, (int, str)) else type(k).__name__}]") for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            queue.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
        elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "modus_mega", "megatron") and hasattr(obj, "__dict__"):
            queue.extend((v, f"{path}.{k}") for k, v in vars(obj).items())
    return found


def _ptrs(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.untyped_storage().nbytes()}


def _nbytes(found: Storages) -> int:
    return sum(nbytes for nbytes, _, _ in found.values())


def _kinds(ds_engine: Any) -> dict[str, set[int]]:
    """Storages of the weights, master weights, optimizer states, reduce buckets and pipe buffers the engine holds now."""
    module_params = list(ds_engine.module.parameters())
    adamw = ds_engine.optimizer.optimizer if hasattr(ds_engine.optimizer, "optimizer") else ds_engine.optimizer
    weights = _ptrs([*module_params, *(getattr(p, "ds_tensor", None) for p in module_params)])
    # The tensors AdamW steps: its state's keys (ZeRO 3 hands it each sub-group only during the step).
    stepped = [*adamw.state, *(p for g in adamw.param_groups for p in g["params"])]
    buckets = getattr(ds_engine.optimizer, "ipg_buckets", {}).values()
    return {
        "weights": weights,
        "master_weights": _ptrs(stepped) - weights,
        "optimizer_states": _ptrs(t for state in adamw.state.values() for t in state.values() if torch.is_tensor(t)),
        "buckets": _ptrs(b for bucket in buckets for b in _as_list(bucket.buffer)),
        "pipe": set(_storages(_pipe_roots(ds_engine))),
    }


def _pipe_roots(ds_engine: Any) -> list[Any]:
    """What a ``PipelineEngine`` keeps between its instructions (nothing without a pipeline)."""
    names = ("pipe_buffers", "pipe_recv_buf", "_grad_layer_buf", "grad_layer", "meta_buffer")
    return [getattr(ds_engine, name, None) for name in names]


def _pipe_roles(ds_engine: Any) -> dict[str, int]:
    """Bytes of the pipeline engine's buffers now, by ``PipeBuffers``' roles, and the received gradient apart.

    in flight: the ``StageActivations`` received from the previous stage (``inputs`` past the
    first stage) and sent to the next (``outputs`` before the last); kept: everything else
    (receive buffers, the first stage's loaded inputs, the last stage's labels and outputs);
    input gradient: the gradient of a received hidden state, until it is sent back.
    """
    buffers, first, last = ds_engine.pipe_buffers, ds_engine.is_first_stage(), ds_engine.is_last_stage()
    received = [] if first else [t for inputs in buffers["inputs"] if inputs is not None for t in inputs]
    sent = [] if last else [t for outputs in buffers["outputs"] if outputs is not None for t in outputs]
    input_gradient = _storages([t.grad for t in received])
    in_flight = {ptr: v for ptr, v in _storages([received, sent]).items() if ptr not in input_gradient}
    everything = _storages(_pipe_roots(ds_engine))
    kept = {ptr: v for ptr, v in everything.items() if ptr not in in_flight and ptr not in input_gradient}
    return {"in_flight": _nbytes(in_flight), "kept": _nbytes(kept), "input_gradient": _nbytes(input_gradient)}


def _classify(found: Storages, kinds: dict[str, set[int]]) -> dict[str, Any]:
    """Bytes of ``found`` by kind; what no kind claims is gradients, scalars aside (the norm, the overflow flag)."""
    result: dict[str, Any] = {kind: 0 for kind in kinds}
    result.update(gradients=0, scalars={})
    for ptr, (nbytes, path, scalar) in found.items():
        kind = next((k for k, ptrs in kinds.items() if ptr in ptrs), None)
        if kind is not None:
            result[kind] += nbytes
        elif scalar:
            result["scalars"][path] = nbytes
        else:
            result["gradients"] += nbytes
    return result


def _as_list(buffer: Any) -> list[torch.Tensor]:
    return list(buffer) if isinstance(buffer, (list, tuple)) else [buffer]


def _bf16_engine(cfg: Any, ctx: ParallelContext) -> tuple[Any, Any, StepLoss]:
    """The engine GPU training builds (``deepspeed_config`` with bf16 on), here on CPU: ``build_engine``'s steps."""
    import deepspeed

    loss = StepLoss(cfg.training, cross_entropy_fn(ctx), loss_scale(cfg, ctx), NonFiniteGuard(ctx.device))
    model, vae = build_model(cfg, ctx, loss_fn=loss), build_vae(cfg, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SkippableAdamW(params, lr=cfg.training.optim.lr)  # as build_engine
    config = deepspeed_config(cfg, ctx)
    config["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, config=config,
        mpu=None if ctx.pp > 1 else ctx.deepspeed_mpu(), dist_init_required=False,
    )  # fmt: skip
    return engine, vae, loss


Snapshot = tuple[Storages, dict[str, set[int]]]  # what the engine holds at one point, and its kinds then


def _run_micro_batches(cfg: Any, ctx: ParallelContext, ds_engine: Any, vae: Any, dtype: torch.dtype) -> tuple[list[Snapshot], dict]:
    """pp = 1: forward, backward and step of two micro-batches; a snapshot after each backward."""
    loader = iter(PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, ds_engine.module.vocab, ctx.dp_rank, ctx.dp))
    cross_entropy = cross_entropy_fn(ctx)
    snapshots = []
    for micro in range(ACCUMULATION):
        generator = micro_batch_generator(cfg.training.seed, 0, ctx.dp_rank * ACCUMULATION + micro, ctx.device)
        inputs = prepare_step_inputs(next(loader), vae, cfg.model, generator)
        inputs.model.vit_patches = inputs.model.vit_patches.to(dtype)
        inputs.model.vae_tokens = inputs.model.vae_tokens.to(dtype)
        num_ce, num_mse = ctx.all_reduce_dp([*inputs.targets.counts])
        logits, velocity = ds_engine(inputs.model, inputs.targets.ce_index, inputs.targets.mse_index)
        terms = modus_loss(logits, velocity, inputs.targets, int(num_ce), int(num_mse), cross_entropy=cross_entropy)  # fmt: skip
        ds_engine.backward(terms.loss * ctx.dp, scale_wrt_gas=False)
        del logits, velocity, terms, inputs
        snapshots.append((_storages(ds_engine), _kinds(ds_engine)))
        ds_engine.step()
    return snapshots, {}


def _observe_instructions(ds_engine: Any, observe: Callable[[str], None]) -> None:
    """Call ``observe(name)`` after every instruction the ``PipelineEngine`` runs (its dispatch table, per instance)."""

    def followed(name: str, run: Callable[..., None]) -> Callable[..., None]:
        def instruction(engine: Any, **kwargs: Any) -> None:
            run(engine, **kwargs)
            observe(name)

        return instruction

    table = type(ds_engine)._INSTRUCTION_MAP
    ds_engine._INSTRUCTION_MAP = {kind: followed(kind.__name__, run) for kind, run in table.items()}


def _run_pipeline(
    cfg: Any, ctx: ParallelContext, ds_engine: Any, vae: Any, dtype: torch.dtype, loss: StepLoss
) -> tuple[list[Snapshot], dict]:
    """pp > 1: two optimizer steps of ``train_batch``; in the second, the pipe buffers after every
    instruction and a snapshot after each backward and after the reduction (module docstring)."""
    loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, ds_engine.module.vocab, ctx.dp_rank, ctx.dp)
    batch = next(b for b in loader if (b.ce_labels != IGNORE_LABEL).any() and (b.model.vae_timesteps > 0).any())
    steps = [
        prepare_step_inputs(
            batch, vae, cfg.model, micro_batch_generator(cfg.training.seed, 0, ctx.dp_rank * ACCUMULATION + micro, ctx.device)
        )
        for micro in range(ACCUMULATION)
    ]  # fmt: skip
    num_ce, num_mse = ctx.all_reduce_dp([sum(s.targets.ce_index.numel() for s in steps), sum(s.targets.mse_index.numel() for s in steps)])
    snapshots: list[Snapshot] = []
    roles: list[dict[str, int]] = []
    measuring = False

    def observe(instruction: str) -> None:
        if measuring:
            roles.append(_pipe_roles(ds_engine))
            if instruction in ("BackwardPass", "ReduceGrads"):
                snapshots.append((_storages(ds_engine), _kinds(ds_engine)))

    _observe_instructions(ds_engine, observe)
    for step in range(PIPELINE_STEPS):
        measuring = step == PIPELINE_STEPS - 1
        loss.begin_step((int(num_ce), int(num_mse)))
        ds_engine.train_batch(iter([stage_micro_batch(dataclasses.replace(s, model=s.model.in_compute_dtype(dtype))) for s in steps]))
    model = steps[0].model
    tensors = MicroBatchTensors(
        tokens=model.token_type.numel(),
        vit_patches=model.vit_patches.shape[0],
        vit_images=model.vit_cu_seqlens.numel() - 1,
        vae_tokens=model.vae_tokens.shape[0],
        ce_tokens=steps[0].targets.ce_index.numel(),
        mse_tokens=steps[0].targets.mse_index.numel(),
    )
    pipe = {role: max(r[role] for r in roles) for role in roles[0]}
    return snapshots, {"pipe": pipe, "micro_batch": dataclasses.asdict(tensors)}


def _measure_layout(raw: dict, layout: dict[str, Any]) -> dict[str, Any]:
    """Build ``layout``'s engine, run its optimizer step(s) of two micro-batches, return this rank's bytes by kind."""
    cfg = config_from_dict(copy.deepcopy(raw))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.zero_stage = layout["tp"], layout["pp"], layout["zero"]
    cfg.training.grad_accum_steps = ACCUMULATION
    cfg.training.ema_decay = EMA_DECAY
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        if layout["bf16"]:
            ds_engine, vae, loss = _bf16_engine(cfg, ctx)
            # The EMA averages DeepSpeed's fp32 master fragments, which its ZeRO-0 bf16 wrapper
            # does not link at pp = 1 (a pipeline's BF16_Optimizer does).
            ema = EmaWeights(ds_engine.module, EMA_DECAY) if layout["zero"] or ctx.pp > 1 else None
        else:
            train_engine = build_engine(cfg, ctx)
            ds_engine, vae, ema, loss = train_engine.engine, train_engine.vae, train_engine.ema, train_engine.step.loss
        dtype = torch.bfloat16 if layout["bf16"] else torch.float32
        if ctx.pp > 1:
            snapshots, extra = _run_pipeline(cfg, ctx, ds_engine, vae, dtype, loss)
        else:
            snapshots, extra = _run_micro_batches(cfg, ctx, ds_engine, vae, dtype)
        final = _kinds(ds_engine)
        after_step = _classify(_storages(ds_engine), final)
        # ZeRO 3 hands AdamW its master partitions only inside the step; they live from
        # initialisation on, so their addresses name them in the snapshots before it too.
        during = [
            _classify(found, {**now, "master_weights": now["master_weights"] | final["master_weights"]})
            for found, now in snapshots
        ]
        vae_bytes = sum(p.numel() * p.element_size() for p in vae.parameters())
        return {
            "weights": after_step["weights"] + vae_bytes,
            "master_weights": after_step["master_weights"],
            "optimizer_states": after_step["optimizer_states"],
            "gradients_accumulating": during[0]["gradients"],  # after the first backward
            "gradients_boundary": during[-1]["gradients"],  # after the reduction (the last backward at pp = 1)
            "buckets": max(m["buckets"] for m in during),
            "scalars": {path: n for m in (*during, after_step) for path, n in m["scalars"].items()},
            "after_step_gradients": after_step["gradients"],
            "ema": None if ema is None else sum(t.numel() * t.element_size() for t in ema.shadow.values()),
            **extra,
        }
    finally:
        parallel_state.destroy_model_parallel()  # the process group stays for the next layout
        gc.collect()


def _worker(raw: dict, layouts: list[dict[str, Any]], out: str) -> None:
    """Measure every layout in one process group (Megatron's groups are rebuilt per layout); write rank<r>.json."""
    measured = {}
    for layout in layouts:
        result = _measure_layout(raw, layout)
        measured[_name(layout, torch.distributed.get_world_size())] = result
    rank = torch.distributed.get_rank()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(measured))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the tests


def _tiny_odd() -> dict:
    """configs/tiny.json with an odd ViT width (33, 3 heads), as a dict for the spawned ranks."""
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    cfg.model.vit.hidden_size, cfg.model.vit.num_heads, cfg.model.vit.intermediate_size = 33, 3, 66
    cfg.data.token_budget = 256
    return config_to_dict(cfg)


def _run(world_size: int, layouts: list[dict[str, Any]], out: Path) -> dict[str, list[dict[str, Any]]]:
    """Per layout name, what each rank measured."""
    run_distributed(_worker, world_size, _tiny_odd(), layouts, str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    return {name: [rank[name] for rank in ranks] for name in ranks[0]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Per layout name, what each of two ranks measured."""
    return _run(2, TWO_RANKS, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Per layout name, what each of four ranks measured."""
    return _run(4, FOUR_RANKS, tmp_path_factory.mktemp("four_ranks"))


TWO_RANK_LAYOUTS = [_name(layout, 2) for layout in TWO_RANKS]
FOUR_RANK_LAYOUTS = [_name(layout, 4) for layout in FOUR_RANKS]
ALL_LAYOUTS = TWO_RANK_LAYOUTS + FOUR_RANK_LAYOUTS
PIPELINE_LAYOUTS = [name for name in ALL_LAYOUTS if "-pp1-" not in name]


@pytest.fixture
def measured(request: pytest.FixtureRequest, name: str) -> list[dict[str, Any]]:
    """What each rank of layout ``name`` measured (one spawn per world size, shared by the tests)."""
    runs = request.getfixturevalue("four_ranks" if name in FOUR_RANK_LAYOUTS else "two_ranks")
    return runs[name]


def _case(name: str) -> tuple[Layout, Precision, int]:
    """(layout, precision, world size) of a measured layout name such as ``tp2-pp1-dp1-zero3-fp32``."""
    tp, pp, dp, zero, dtype = name.split("-")
    degrees = int(tp[2:]), int(pp[2:]), int(dp[2:]), int(zero[4:])
    layout = Layout(*degrees, False, "none", token_budget=256, grad_accum=ACCUMULATION)
    # bf16 on CPU: AdamW's step counters live in the training device's memory here.
    precision = dataclasses.replace(MIXED_BF16, step_counter_bytes=4) if dtype == "bf16" else FP32
    return layout, precision, layout.gpus


def _coordinates(rank: int, layout: Layout) -> tuple[int, int]:
    """(pipeline stage, dp rank) of ``rank``: Megatron / DeepSpeed rank order, tp fastest, then dp, then pp."""
    return rank // (layout.tp * layout.dp), (rank // layout.tp) % layout.dp


@pytest.fixture(scope="module")
def tiny_shape() -> ModelShape:
    """Parameter placement of the measured model."""
    return model_shape(config_from_dict(_tiny_odd()).model)


@pytest.mark.parametrize("name", ALL_LAYOUTS)
def test_weights_master_weights_optimizer_states_and_ema_equal_the_model(
    measured: list[dict], tiny_shape: ModelShape, name: str
) -> None:
    layout, precision, world_size = _case(name)
    assert len(measured) == world_size
    for rank, got in enumerate(measured):
        stage, dp_rank = _coordinates(rank, layout)
        want = model_states(tiny_shape, layout, stage, precision, ema="sharded", dp_rank=dp_rank)
        assert (got["weights"], got["master_weights"], got["optimizer_states"]) == (
            want.weights,
            want.master_weights,
            want.optimizer_states,
        ), f"rank {rank}"
        if got["ema"] is not None:
            assert got["ema"] == want.ema, f"rank {rank}"


@pytest.mark.parametrize("name", ALL_LAYOUTS)
def test_gradients_equal_the_model_at_both_accumulation_steps(
    measured: list[dict], tiny_shape: ModelShape, name: str
) -> None:
    """The model's gradient term is the larger of the two; each one is explained separately too.

    With pp > 1 the second is measured after the pipeline's reduction (its ``ReduceGrads``).
    """
    layout, precision, _ = _case(name)
    z = layout.zero_stage
    for rank, got in enumerate(measured):
        stage, dp_rank = _coordinates(rank, layout)
        trainable = tuple(t.local_numel(layout.tp) for t in tiny_shape.stage_tensors(stage, layout.pp) if t.trainable)
        total = sum(trainable)
        flat = flat_numel(total, layout.dp)
        partition = flat // layout.dp
        reduced = zero12_gradient_elements(trainable, layout.dp)[dp_rank]  # whole tensors + padding zeros
        padding = partition - max(0, min((dp_rank + 1) * partition, total) - dp_rank * partition)
        zero3 = zero_elements(tiny_shape, layout, stage, precision).gradients
        accumulating, boundary = {
            0: (total, total),  # every tensor's .grad
            1: (total, reduced),  # full .grad, reduced into the partition buffer at the boundary
            2: (reduced - padding, reduced),  # the partition buffer; the zero padding only at the boundary
            3: (zero3, zero3),  # one flat partition buffer
        }[z]
        if bf16_pipeline_optimizer(layout, precision):
            accumulating = boundary = total + flat  # every tensor's .grad and the flat buffer they accumulate into
        assert got["gradients_accumulating"] == accumulating * precision.grad_bytes, f"rank {rank}"
        assert got["gradients_boundary"] == boundary * precision.grad_bytes, f"rank {rank}"
        want = model_states(tiny_shape, layout, stage, precision, ema="none", dp_rank=dp_rank).gradients
        assert max(got["gradients_accumulating"], got["gradients_boundary"]) == want, f"rank {rank}"


@pytest.mark.parametrize("name", ALL_LAYOUTS)
def test_nothing_else_is_held(measured: list[dict], tiny_shape: ModelShape, name: str) -> None:
    """Reduce buckets as modelled, scalars only besides, and only ZeRO 3 and the bf16 pipeline's
    optimizer keep a gradient buffer over the step (its partition; the flat accumulation buffer)."""
    layout, precision, _ = _case(name)
    z = layout.zero_stage
    # ZeRO 2 frees its bucket at the end of every backward (after our measurement point), ZeRO 1 at the boundary's.
    buckets = reduce_buckets(layout, precision, DeepSpeedSettings()) if z in (1, 3) else 0
    for rank, got in enumerate(measured):
        stage, _ = _coordinates(rank, layout)
        e = zero_elements(tiny_shape, layout, stage, precision)
        kept = {3: e.gradients, 0: e.weights if bf16_pipeline_optimizer(layout, precision) else 0}.get(z, 0)
        assert got["buckets"] == buckets, f"rank {rank}"
        assert got["after_step_gradients"] == kept * precision.grad_bytes, f"rank {rank}"
        assert all(n <= SCALAR_BYTES for n in got["scalars"].values()), got["scalars"]


@pytest.mark.parametrize("name", PIPELINE_LAYOUTS)
def test_pipe_buffers_equal_the_model(measured: list[dict], tiny_shape: ModelShape, name: str) -> None:
    """The most each role of the pipe buffers held in the second step, on every stage, as ``pipeline_buffers``
    derives it for the micro-batch the rank ran; a received gradient is one [T, D] hidden state."""
    layout, precision, _ = _case(name)
    for rank, got in enumerate(measured):
        stage, _ = _coordinates(rank, layout)
        tensors = MicroBatchTensors(**got["micro_batch"])
        want = pipeline_buffers(tiny_shape, layout, tensors, stage, precision)
        assert (got["pipe"]["in_flight"], got["pipe"]["kept"]) == (want.in_flight, want.kept), f"rank {rank}"
        hidden = tensors.tokens * tiny_shape.cfg.llm.hidden_size * precision.activation_bytes
        assert got["pipe"]["input_gradient"] == (hidden if stage > 0 else 0), f"rank {rank}"
        assert tensors.ce_tokens and tensors.mse_tokens  # logits, velocities and their labels are in the bytes


def test_stage_tensors_follow_the_pipeline_stages_module_order(tiny_shape: ModelShape) -> None:
    """What DeepSpeed flattens per stage: ``PipelineStage``'s parameters, in its order (tp = 1, pp = 2)."""
    with torch.device("meta"):
        model = ModusModel(tiny_shape.cfg)
    for stage in range(2):
        built = [(p.numel(), p.requires_grad) for p in PipelineStage(model, stage, 2, torch.device("cpu")).parameters()]
        assert built == [(t.numel, t.trainable) for t in tiny_shape.stage_tensors(stage, 2)], f"stage {stage}"


def test_the_layouts_exercise_zero_padding(tiny_shape: ModelShape) -> None:
    """The odd ViT width leaves the flat buffers unaligned and some tensors odd, so padding is in the bytes above."""
    for tp, pp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        sizes = [t.local_numel(tp) for t in tiny_shape.stage_tensors(0, pp) if t.trainable]
        assert flat_numel(sum(sizes), 2) > sum(sizes)
        assert any(n % 2 for n in sizes)
