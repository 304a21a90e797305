"""Pipeline parallelism with DeepSpeed's ``PipelineModule``, built from outside the model (STYLE 1).

Stages. Each stage is ONE DeepSpeed pipeline layer (``PipelineStage``), built only on the
ranks of that stage, holding the model's own modules under the model's attribute names:

    stage 0        embed_tokens, vit, connector, vit_pos_embed, time_embedder, vae2llm,
                   latent_pos_embed, then its decoder layers
    stage s        decoder layers [s * L / pp, (s + 1) * L / pp)
    stage pp - 1   its decoder layers, then final_norms, lm_head, llm2vae (run by its loss)

Decoder layers sit in a ``ModuleDict`` keyed by their global index, so a stage's parameter
names ARE the global ones (``layers.5.experts.1.q_proj.weight``): ``init_weights`` by name
gives the same full weights at every pp (STYLE 3), and DeepSpeed's per-stage checkpoint
files (``layer_<stage>-model_<tp>-model_states.pt``) hold global names. DeepSpeed's module
prefixes them with the stage index (``1.layers.5...``); ``global_parameter_name`` strips it.

Build (``build_pipeline``): the whole model on the meta device (no memory), then each rank
allocates its own stage's modules. The rest of construction (tensor-parallel hooks,
initialisation by global name, freezing, recomputation) is ``parallel/build.py``'s one
ordered list, applied to the stage exactly as to a whole model at pp = 1.

What crosses stages. Between stages a micro-batch is the tuple ``StageActivations``: this
tp rank's rows of the hidden states [R, D] (float, with gradient; R = T, or with sequence
parallelism T padded to a multiple of tp, over tp: each tp rank sends its own rows to its
peer on the next stage, 1/tp of the bytes) and the per-token INTEGER metadata
``build_context`` needs (token_type, position_ids, attn_lo, attn_hi). DeepSpeed sends a
gradient back for every float tensor of the tuple and waits for one, so a float tensor
without gradient would hang the backward: nothing but the hidden states is float. Every
shape follows from T (the fixed token budget), so shapes are static and DeepSpeed sends
their metadata once. The first stage splits the embeddings into rows
(``Collectives.scatter``), the last gathers them back: its output is the final hidden
states [T, D].

What does not cross stages. DeepSpeed loads each micro-batch from one iterator of
``(inputs, labels)`` pairs (``stage_micro_batch``): the inputs on the first stage, every
field of the ``ModelInputs`` record in order, and the labels on the last, every field of
the ``LossTargets`` record (target positions included, whose lengths vary per micro-batch,
which only a loaded tensor may). Both are flattened and rebuilt by ``dataclasses.fields``
(``model/inputs.py``), so a field added to either record travels without a change here,
and no target, position or float label ever crosses a stage boundary.

The loss. The last stage's loss runs the heads at the target positions
(``model/modus.py``'s ``output_heads`` on the stage's own head modules) and then the
``MicroBatchLoss`` the pipeline is built with (``modus_mega/losses.py``); the training step
(``training/step.py``) makes it, with its scaling for DeepSpeed's pipeline engine, so this
module knows nothing of training. The global target counts are fixed for a step and set
on the loss once per step.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import Tensor, nn

from modus_mega.config import ModusConfig
from modus_mega.losses import LossTargets, MicroBatchLoss
from modus_mega.model.inputs import ModelInputs, StepInputs, record_from_tensors, record_tensors
from modus_mega.model.layers import LinearFactory
from modus_mega.model.modus import ModusModel, embed_inputs, output_heads
from modus_mega.model.mot import LayerContext
from modus_mega.ops.attention import AttentionBackend, get_attention_backend
from modus_mega.parallel.context import ParallelContext

# ModusModel's modules by stage (besides the decoder layers); together they are all of them.
EMBEDDING_MODULES = (
    "embed_tokens", "vit", "connector", "vit_pos_embed", "time_embedder", "vae2llm", "latent_pos_embed",
)  # fmt: skip
HEAD_MODULES = ("final_norms", "lm_head", "llm2vae")


class StageActivations(NamedTuple):
    """What one stage sends the next for one micro-batch; all [T] but ``hidden`` [R, D]."""

    hidden: Tensor  # [R, D] float: this tp rank's rows of the residual stream, the only tensor with a gradient
    token_type: Tensor  # [T] long
    position_ids: Tensor  # [T] long
    attn_lo: Tensor  # [T] int32
    attn_hi: Tensor  # [T] int32


def global_parameter_name(pipeline_name: str) -> str:
    """The model's name of a ``ModusPipeline`` parameter (``ModusPipeline.named_parameters``).

    ``"1.layers.5.experts.0.q_proj.weight"`` (stage 1) -> ``"layers.5.experts.0.q_proj.weight"``.
    """
    stage, _, name = pipeline_name.partition(".")
    if not stage.isdigit() or not name:
        raise ValueError(f"{pipeline_name!r} is not a pipeline parameter name ('<stage>.<global name>')")
    return name


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """Global indices of the decoder layers of ``stage`` (an even split; pp divides num_layers)."""
    per_stage = num_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device module on ``device``, uninitialised, keeping the parameters' attributes.

    ``to_empty`` makes new ``Parameter`` objects; Megatron's ``tensor_model_parallel`` /
    ``partition_dim`` markers (which ``init_hooks`` and the gradient norm read) are copied over.
    """
    assert next(module.buffers(), None) is None, (
        "a model buffer would stay uninitialised after to_empty (init_weights fills parameters only); "
        "make it a frozen parameter (like SinCos2DPositionEmbedding) or recompute it here"
    )
    attributes = {name: dict(vars(param)) for name, param in module.named_parameters()}
    module.to_empty(device=device)
    for name, param in module.named_parameters():
        vars(param).update(attributes[name])


class PipelineStage(nn.Module):
    """One pipeline stage: a slice of a (meta-built) ``ModusModel``, allocated on ``device``.

    Holds the model's modules under the model's attribute names, so the model's own
    ``embed_inputs`` and ``output_heads`` run on it unchanged. The first stage takes
    ``stage_micro_batch``'s inputs, every other stage a ``StageActivations``; the last stage returns
    the final hidden states [T, D] (its loss runs the heads: ``heads_and_loss``), every other
    stage a ``StageActivations``.
    """

    def __init__(self, model: ModusModel, stage: int, num_stages: int, device: torch.device) -> None:
        super().__init__()
        self.llm_cfg = model.cfg.llm
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        names = (EMBEDDING_MODULES if self.is_first else ()) + (HEAD_MODULES if self.is_last else ())
        for name in names:
            setattr(self, name, getattr(model, name))
        indices = stage_layers(len(model.layers), num_stages, stage)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in indices})
        _materialize(self, device)
        # The run's backend, which build_pipeline gives the model; a model built without one resolves its config here.
        self.attention = model.attention
        if self.attention is None:
            self.attention = get_attention_backend(model.cfg.attention_backend, device)
        self.collectives = model.collectives

    def forward(self, micro_batch: tuple[Tensor, ...]) -> StageActivations | Tensor:
        if self.is_first:
            inputs = record_from_tensors(ModelInputs, micro_batch)  # stage_micro_batch's first-stage tuple
            hidden = self.collectives.scatter(embed_inputs(self, inputs))
            x = StageActivations(hidden, inputs.token_type, inputs.position_ids, inputs.attn_lo, inputs.attn_hi)
        else:
            x = StageActivations(*micro_batch)

        ctx = self._layer_context(x)
        hidden = x.hidden
        for layer in self.layers.values():
            hidden = layer(hidden, ctx)

        if self.is_last:
            return self.collectives.gather(hidden, x.token_type.numel())  # [T, D]
        return x._replace(hidden=hidden)

    def _layer_context(self, x: StageActivations) -> LayerContext:
        """The layer context from the metadata that travelled with the hidden states.

        RoPE tables take the hidden states' dtype (this stage may not hold the embedding).
        """
        return LayerContext.build(
            self.llm_cfg, x.token_type, x.position_ids, x.attn_lo, x.attn_hi, x.hidden.dtype, self.attention,
            self.collectives,
        )  # fmt: skip


def heads_and_loss(loss_fn: MicroBatchLoss, stage: PipelineStage, hidden: Tensor, labels: tuple[Tensor, ...]) -> Tensor:
    """DeepSpeed's ``loss_fn(outputs, labels)`` on the last stage: the heads of ``stage`` at the
    target positions of the ``LossTargets`` loaded as ``labels``, then ``loss_fn``.

    ``hidden``: the stage's output, the final hidden states [T, D].
    """
    targets = record_from_tensors(LossTargets, labels)
    logits, velocity = output_heads(stage, hidden, targets.ce_index, targets.mse_index)
    return loss_fn(logits, velocity, targets)


class ModusPipeline(PipelineModule):
    """DeepSpeed's ``PipelineModule`` over ``PipelineStage``s; ``vocab`` as on ``ModusModel``.

    ``loss_fn`` is what the last stage runs on each micro-batch (None: a pipeline that is
    only built, e.g. to read its initial weights, never trained).
    """

    def __init__(self, model: ModusModel, ctx: ParallelContext, loss_fn: MicroBatchLoss | None) -> None:
        topology = PipeModelDataParallelTopology(num_pp=ctx.pp, num_mp=ctx.tp, num_dp=ctx.dp)
        coord = topology.get_coord(ctx.rank)
        assert (coord.pipe, coord.data, coord.model) == (ctx.pp_rank, ctx.dp_rank, ctx.tp_rank), (
            "DeepSpeed's pipeline topology and Megatron's groups order ranks differently"
        )
        stages = [LayerSpec(PipelineStage, model, s, ctx.pp, ctx.device) for s in range(ctx.pp)]
        deepspeed.init_distributed(ctx.backend, auto_mpi_discovery=False, verbose=False)  # wraps the running group
        super().__init__(stages, topology=topology, loss_fn=None, partition_method="uniform")
        if loss_fn is not None and self.stage.is_last:  # the heads are the stage's modules, built just now
            self.loss_fn = partial(heads_and_loss, loss_fn, self.stage)
        self.vocab = model.vocab

    @property
    def stage(self) -> PipelineStage:
        """This rank's stage module."""
        (stage,) = self.forward_funcs
        return stage


def build_pipeline(
    cfg: ModusConfig,
    ctx: ParallelContext,
    linears: LinearFactory,
    attention: AttentionBackend,
    loss_fn: MicroBatchLoss | None,
) -> ModusPipeline:
    """This rank's pipeline stage, allocated on its device but not initialised (``parallel/build.py`` goes on).

    The whole model is built on the meta device first, so the stage keeps the model's
    global parameter names and no rank allocates another stage's weights. Raises
    ``ValueError`` for tied input/output embeddings, which would live on two stages.
    """
    if cfg.model.llm.tie_word_embeddings:
        raise ValueError(
            f"model.llm.tie_word_embeddings=true with parallel.pp={ctx.pp}: the embedding (first stage) and the "
            "LM head (last stage) cannot share a weight; untie them or use parallel.pp=1"
        )
    with torch.device("meta"):
        model = ModusModel(cfg.model, linears, attention)
    owned = set(EMBEDDING_MODULES) | set(HEAD_MODULES) | {"layers"}
    assert {name for name, _ in model.named_children()} == owned, (
        "ModusModel's modules changed: assign each to a stage in EMBEDDING_MODULES / HEAD_MODULES"
    )
    return ModusPipeline(model, ctx, loss_fn)


def stage_micro_batch(step: StepInputs) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """One micro-batch as DeepSpeed's pipeline loads it: (first stage's inputs, last stage's labels).

    The inputs are ``step.model``'s fields, the labels ``step.targets``'s, each in declaration
    order (``record_tensors``; the stages rebuild the records with ``record_from_tensors``).
    ``step.model`` is already in the compute dtype (``ModelInputs.in_compute_dtype``).
    """
    return record_tensors(step.model), record_tensors(step.targets)


class GradClipper:
    """Global gradient-norm clipping over tp and pp, run as a pre-step hook of the optimizer.

    Used where DeepSpeed's own clipping keeps no norm (fp32 without ZeRO). DeepSpeed's
    ``clip_grad_norm_`` cannot be used with a pipeline: it counts replicated parameters only
    on model-parallel rank 0, which under its pipeline grid is one stage's rank, not one per stage.
    """

    def __init__(self, params: list[nn.Parameter], max_norm: float, ctx: ParallelContext) -> None:
        self.params = params
        self.max_norm = max_norm
        self.ctx = ctx
        self.last_norm = float("nan")  # before clipping, of the last optimizer step

    def __call__(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        # tp-replicated parameters count once (tp rank 0); tp shards everywhere; summed over tp and pp.
        counted = [
            p.grad for p in self.params
            if p.grad is not None and (self.ctx.tp_rank == 0 or getattr(p, "tensor_model_parallel", False))
        ]  # fmt: skip
        if counted:
            square = torch.stack([g.float().norm() for g in counted]).pow(2).sum()
        else:
            square = torch.zeros((), device=self.ctx.device)
        for group, size in ((self.ctx.tp_group, self.ctx.tp), (self.ctx.pp_group, self.ctx.pp)):
            if size > 1:
                dist.all_reduce(square, group=group)
        norm = square.sqrt()
        self.last_norm = float(norm)
        coef = torch.clamp(self.max_norm / (norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
