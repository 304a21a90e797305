"""Where every parameter of the model lives under a (tp, pp) layout, and what one token costs.

The model is built on the meta device (no memory, no init) and every named parameter is
classified by three questions the memory and step-time models need:

- **pipeline place**: the first stage holds the input side (token embedding, ViT,
  connector, 2D input modules, sin-cos tables); decoder layers are split evenly over
  stages; the last stage holds the two final norms, the LM head and ``llm2vae``
  (DeepSpeed ``PipelineModule`` layout, DESIGN §6). The frozen VAE is on every stage:
  each rank encodes its micro-batches (the first stage needs the latents as inputs, the
  last one its velocity targets);
- **tensor-parallel rule**: q/k/v (weights and biases), o, gate/up/down and the vocabulary
  tables are split over tp (Megatron-core column / row / vocab-parallel layers, as
  ``modus_mega/parallel/tensor_parallel.py`` builds them); everything else is replicated
  on every tp rank (norms, the o bias, the ViT and the 2D modules, which use ``nn.Linear``);
- **trainable or frozen**: ``requires_grad`` after the build (the sin-cos tables are frozen
  parameters), the 1D expert when ``freeze_1d_expert``, and the VAE, exactly as the
  training engine sets them.

Besides the totals, every tensor is kept in module order (``ModelShape.tensors``): ZeRO's
byte counts depend on tensor boundaries, not only on totals (DeepSpeed lays the trainable
tensors out in this order in one flat buffer and cuts it into dp partitions; ZeRO 3 pads
every tensor to a multiple of dp and keeps small tensors whole), see ``plan/memory.py``.
A pipeline stage registers its modules in its own order (``PipelineStage``: the first
stage's input modules, the last stage's head modules, then the decoder layers), which
``ModelShape.stage_tensors`` follows for pp > 1.

A parameter the rules do not know raises, so a model change cannot silently skew a plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
import torch
from torch.utils.flop_counter import FlopCounterMode

from modus_mega.config import ModelConfig, VAEConfig

_LAYER = re.compile(r"^layers\.(\d+)\.")
_LAYER_SHARDED = re.compile(
    r"^layers\.\d+\.experts\.\d+\.((q_proj|k_proj|v_proj)\.(weight|bias)|o_proj\.weight|mlp\.(gate_proj|up_proj|down_proj)\.weight)$"
)
_FROZEN_1D_EXPERT = re.compile(r"^layers\.\d+\.experts\.0\.")
# ModusModel's modules besides the decoder layers, by stage, in the order ``PipelineStage`` registers them
# (parallel/pipeline.py's EMBEDDING_MODULES, HEAD_MODULES; tests/plan/test_memory_engine.py builds the stages to check).
FIRST_STAGE_MODULES = ("embed_tokens", "vit", "connector", "vit_pos_embed", "time_embedder", "vae2llm", "latent_pos_embed")
LAST_STAGE_MODULES = ("final_norms", "lm_head", "llm2vae")
_PIPELINE_ORDER = {module: i for i, module in enumerate(FIRST_STAGE_MODULES + LAST_STAGE_MODULES + ("layers",))}
_VOCAB_TABLES = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one part of the model, by tensor-parallel rule and trainability."""

    sharded_trainable: int = 0  # split over tp ranks
    replicated_trainable: int = 0  # held whole by every tp rank
    sharded_frozen: int = 0
    replicated_frozen: int = 0
    trainable_tensors: int = 0  # trainable tensors (each rank holds a shard of each)

    def __add__(self, other: "ParamCounts") -> "ParamCounts":
        return ParamCounts(
            self.sharded_trainable + other.sharded_trainable,
            self.replicated_trainable + other.replicated_trainable,
            self.sharded_frozen + other.sharded_frozen,
            self.replicated_frozen + other.replicated_frozen,
            self.trainable_tensors + other.trainable_tensors,
        )

    def scaled(self, n: int) -> "ParamCounts":
        """``n`` copies (``n`` identical decoder layers)."""
        return ParamCounts(
            self.sharded_trainable * n,
            self.replicated_trainable * n,
            self.sharded_frozen * n,
            self.replicated_frozen * n,
            self.trainable_tensors * n,
        )

    def trainable(self, tp: int) -> int:
        """Trainable parameters one tp rank holds."""
        return self.sharded_trainable // tp + self.replicated_trainable

    def frozen(self, tp: int) -> int:
        """Frozen parameters one tp rank holds."""
        return self.sharded_frozen // tp + self.replicated_frozen


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of ``ModusModel``."""

    numel: int  # elements of the whole tensor (before tp sharding)
    module: str  # ModusModel's top-level module holding it ("layers", "vit", "lm_head", ...)
    place: str  # "embed" (first stage), "layer" (decoder layer ``layer``) or "head" (last stage)
    layer: int  # decoder layer index; -1 outside the decoder
    sharded: bool  # split over tp ranks (numel must divide by tp)
    trainable: bool

    def local_numel(self, tp: int) -> int:
        """Elements one tp rank holds."""
        return self.numel // tp if self.sharded else self.numel


@dataclass(frozen=True)
class ModelShape:
    """Parameter placement and per-token costs of one model config (see the module docstring)."""

    cfg: ModelConfig
    embed: ParamCounts  # first stage: token embedding, ViT, connector, 2D input modules, sin-cos tables
    layer: ParamCounts  # one decoder layer, both experts
    head: ParamCounts  # last stage: final norms, LM head, llm2vae
    vae: int  # frozen autoencoder parameters (on every stage: each rank encodes its micro-batches)
    embedding_weight: int  # the token embedding table (a tied LM head repeats it on the last stage)
    expert_linear_weights: int  # weights one token multiplies in one layer: one expert's q, k, v, o, gate, up, down
    vocab_rows: int  # padded vocabulary (rows of the embedding and the LM head)
    largest_sharded: int  # largest trainable tensor split over tp (full size)
    largest_replicated: int  # largest trainable tensor every tp rank holds whole
    tensors: tuple[ParamTensor, ...]  # every parameter tensor in module order (``model.parameters()``)

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return self.cfg.llm.num_layers

    def stage(self, stage: int, pp: int) -> ParamCounts:
        """Parameters of pipeline stage ``stage`` of ``pp`` (before tp sharding), the VAE excluded."""
        if not 0 <= stage < pp or self.num_layers % pp:
            raise ValueError(f"stage {stage} of pp={pp} does not exist for {self.num_layers} layers")
        counts = self.layer.scaled(self.num_layers // pp)
        if stage == 0:
            counts = counts + self.embed
        if stage == pp - 1:
            counts = counts + self.head
            if pp > 1 and self.cfg.llm.tie_word_embeddings:
                # DeepSpeed's TiedLayerSpec keeps a copy of the shared table on the last stage.
                counts = counts + ParamCounts(sharded_trainable=self.embedding_weight, trainable_tensors=1)
        return counts

    def stage_tensors(self, stage: int, pp: int) -> tuple[ParamTensor, ...]:
        """Parameter tensors of pipeline stage ``stage`` of ``pp`` in its module order, the VAE excluded.

        pp = 1: ``ModusModel``'s order. pp > 1: ``PipelineStage``'s (the stage's modules of
        ``FIRST_STAGE_MODULES`` / ``LAST_STAGE_MODULES`` in that order, then its decoder
        layers), the order DeepSpeed flattens them in. With tied embeddings the last stage
        ends with its copy of the shared table (as ``stage`` counts it).
        """
        if not 0 <= stage < pp or self.num_layers % pp:
            raise ValueError(f"stage {stage} of pp={pp} does not exist for {self.num_layers} layers")
        per_stage = self.num_layers // pp
        first, last = stage == 0, stage == pp - 1

        def held(t: ParamTensor) -> bool:
            if t.place == "layer":
                return t.layer // per_stage == stage
            return first if t.place == "embed" else last

        tensors = tuple(t for t in self.tensors if held(t))
        if pp > 1:
            tensors = tuple(sorted(tensors, key=lambda t: _PIPELINE_ORDER[t.module]))  # stable: module order within
        if last and pp > 1 and self.cfg.llm.tie_word_embeddings:
            tensors += (ParamTensor(self.embedding_weight, "lm_head", "head", -1, sharded=True, trainable=True),)
        return tensors

    def total(self) -> ParamCounts:
        """Every parameter of the trainable model (tp = pp = 1), the VAE excluded."""
        return self.stage(0, 1)

    def largest_tensor(self, tp: int) -> int:
        """Largest trainable tensor one tp rank holds (ZeRO-3 gathers tensors one module at a time)."""
        return max(self.largest_sharded // tp, self.largest_replicated)

    def vae_params(self, stage: int) -> int:
        """Frozen VAE parameters held by ``stage``: all of them on every stage (``training/engine.py``
        builds the VAE on every rank, and every rank encodes its micro-batches in ``training/loop.py``)."""
        return self.vae


def _classify(name: str) -> tuple[str, bool]:
    """(place, sharded over tp) of a parameter name of ``ModusModel``."""
    module = name.partition(".")[0]
    if module == "layers" and _LAYER.match(name):
        return "layer", bool(_LAYER_SHARDED.match(name))
    if module in FIRST_STAGE_MODULES:
        return "embed", name in _VOCAB_TABLES
    if module in LAST_STAGE_MODULES:
        return "head", name in _VOCAB_TABLES
    raise ValueError(
        f"the planner does not know where parameter {name!r} lives in a pipeline or how tp shards it; "
        f"add it to the rules in modus_mega/plan/shapes.py"
    )


def model_shape(cfg: ModelConfig) -> ModelShape:
    """Classify every parameter of ``cfg``'s model (meta-device build, about a second at 7B)."""
    from modus_mega.encoders.vae import FluxAutoEncoder
    from modus_mega.model.modus import ModusModel

    with torch.device("meta"):
        model = ModusModel(cfg)
        vae = FluxAutoEncoder(cfg.vae)
    parts: dict[str, ParamCounts] = {"embed": ParamCounts(), "head": ParamCounts()}
    layers: dict[int, ParamCounts] = {}
    largest = {True: 0, False: 0}  # sharded? -> largest trainable tensor
    tensors = []
    for name, param in model.named_parameters():
        place, sharded = _classify(name)
        trainable = param.requires_grad and not (cfg.llm.freeze_1d_expert and _FROZEN_1D_EXPERT.match(name))
        n = param.numel()
        layer = int(_LAYER.match(name).group(1)) if place == "layer" else -1  # type: ignore[union-attr]
        tensors.append(ParamTensor(n, name.partition(".")[0], place, layer, sharded, trainable))
        counts = ParamCounts(
            sharded_trainable=n if sharded and trainable else 0,
            replicated_trainable=n if not sharded and trainable else 0,
            sharded_frozen=n if sharded and not trainable else 0,
            replicated_frozen=n if not sharded and not trainable else 0,
            trainable_tensors=int(trainable),
        )
        if trainable:
            largest[sharded] = max(largest[sharded], n)
        if place == "layer":
            layers[layer] = layers.get(layer, ParamCounts()) + counts
        else:
            parts[place] = parts[place] + counts
    assert len(set(layers.values())) == 1, "decoder layers differ in parameters"
    expert = model.layers[0].experts[0]
    linear_weights = sum(
        m.weight.numel()
        for m in (expert.q_proj, expert.k_proj, expert.v_proj, expert.o_proj, expert.mlp.gate_proj, expert.mlp.up_proj, expert.mlp.down_proj)
    )
    return ModelShape(
        cfg=cfg,
        embed=parts["embed"],
        layer=layers[0],
        head=parts["head"],
        vae=sum(p.numel() for p in vae.parameters()),
        embedding_weight=model.embed_tokens.weight.numel(),
        expert_linear_weights=linear_weights,
        vocab_rows=model.vocab.padded_size,
        largest_sharded=largest[True],
        largest_replicated=largest[False],
        tensors=tuple(tensors),
    )


def vae_encoder_flops(cfg: VAEConfig, height: int, width: int) -> int:
    """Forward FLOPs of the VAE encoder on one ``height x width`` image (counted on the meta device)."""
    from modus_mega.encoders.vae import FluxAutoEncoder

    with torch.device("meta"):
        vae = FluxAutoEncoder(cfg)
        images = torch.empty(1, cfg.in_channels, height, width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encoder(images)
    return counter.get_total_flops()
