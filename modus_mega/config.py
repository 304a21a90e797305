"""The run configuration: a tree of typed dataclasses loaded from one JSON file.

One JSON file plus ``--set a.b=c`` overrides is the single source of truth for a run.
Every component receives only its own sub-config. Unknown keys, wrong types and
inconsistent values raise ``ValueError`` naming the key, the file and the fix; the
resolved config is written into the run directory (``save_config``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# ----------------------------------------------------------------------------- model


@dataclass
class LLMConfig:
    """The Qwen2-shaped decoder; both MoT experts share these shapes (DESIGN §1)."""

    hidden_size: int = 3584  # model width D
    num_layers: int = 28  # decoder layers, each holding both experts
    num_heads: int = 28  # query heads
    num_kv_heads: int = 4  # key/value heads (GQA); must divide num_heads
    head_dim: int = 128  # per-head width; q/k/v projections are num_heads * head_dim wide
    intermediate_size: int = 18944  # SwiGLU inner width
    rope_theta: float = 1_000_000.0  # RoPE base
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm in the decoder
    qkv_bias: bool = True  # q/k/v projections carry a bias (Qwen2)
    o_bias: bool = False  # o projection bias (Qwen2 has none)
    qk_norm: bool = True  # RMSNorm over head_dim on q and k before RoPE (BAGEL)
    tie_word_embeddings: bool = False  # share embedding and LM head (BAGEL: untied)
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    freeze_1d_expert: bool = False  # BAGEL's freeze_und: no gradient into the 1D expert


@dataclass
class ViTConfig:
    """SigLIP-so400m/14 vision tower, NaViT style (variable resolution, per-image attention)."""

    hidden_size: int = 1152  # ViT width
    intermediate_size: int = 4304  # ViT MLP inner width
    num_heads: int = 16  # ViT attention heads
    num_layers: int = 27  # layers in the pretrained tower
    select_layer: int = -2  # output of this layer is used (-2: 26 of 27 layers run)
    patch_size: int = 14  # pixels per patch side
    max_patches_per_side: int = 70  # side S of the learned position table (S*S rows)
    layer_norm_eps: float = 1e-6  # epsilon of the ViT LayerNorms
    num_channels: int = 3  # image channels

    @property
    def num_layers_used(self) -> int:
        """Layers that actually run: BAGEL drops the layers after ``select_layer``."""
        return self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer


@dataclass
class VAEConfig:
    """The FLUX autoencoder (frozen): 16 latent channels, 8x downsampling."""

    latent_channels: int = 16  # z channels
    base_channels: int = 128  # `ch` of FLUX's AE
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # ch_mult
    num_res_blocks: int = 2  # residual blocks per resolution
    norm_groups: int = 32  # GroupNorm groups in every autoencoder norm (FLUX: 32); must divide every width
    in_channels: int = 3  # image channels
    scale_factor: float = 0.3611  # latent = scale * (z - shift)
    shift_factor: float = 0.1159  # see scale_factor
    sample_posterior: bool = True  # z = mean + std * eps when encoding for training (BAGEL)

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (len(self.channel_multipliers) - 1)


@dataclass
class VocabConfig:
    """The extended vocabulary: the pretrained text vocabulary, then MODUS's new tokens."""

    text_vocab_size: int = 152064  # rows of the pretrained (BAGEL/Qwen2) vocabulary
    vision_start_id: int | None = 151652  # <|vision_start|> inside the text vocab; None: append a new token
    vision_end_id: int | None = 151653  # <|vision_end|> inside the text vocab; None: append a new token
    coordinate_bins: int = 1000  # box coordinate tokens (detection, grounding)
    codebook_size: int = 8192  # tokens per feature codebook (one per feature modality)
    vocab_multiple: int = 128  # the extended vocabulary is padded to a multiple of this


@dataclass
class ModelConfig:
    """The whole MODUS model: decoder, vision tower, autoencoder and the 2D in/out modules."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2  # VAE latent cells per 2D token side (2x2x16 = 64 dims)
    max_latent_size: int = 64  # side of the latent position table, in 2D tokens
    timestep_frequency_dim: int = 256  # width of the sinusoidal timestep features
    zero_init_llm2vae: bool = True  # BAGEL zero-initialises the velocity head
    attention_backend: Literal["auto", "reference", "flex", "cuda"] = "auto"  # ops.attention

    @property
    def patch_latent_dim(self) -> int:
        """Width of one 2D token: latent_patch_size^2 * latent_channels."""
        return self.latent_patch_size**2 * self.vae.latent_channels


# ----------------------------------------------------------------------------- data


@dataclass
class AugmentConfig:
    """One random crop, flip and resize per sample, shared by all its modalities (data/augment.py)."""

    crop_min_side: float = 0.8  # a crop keeps at least this fraction of each side; 1 disables cropping
    hflip: bool = True  # mirror left-right with probability 1/2 (normals, boxes and "left"/"right" follow)
    max_pixels: int = 512 * 512  # images are resized (aspect kept) to at most this many pixels


@dataclass
class DataConfig:
    """How samples become documents and documents become packed micro-batches."""

    source: Literal["procedural", "shards"] = "procedural"  # in-memory procedural scenes, or webdataset shards
    shards: str = ""  # source=shards: directory holding index.json and the *.tar shards (docs/DATA.md)
    val_shards: str = ""  # held-out shard directory for the validation loss (training.eval_every); "" = no validation
    text_tokenizer: str = ""  # source=shards: directory of the Hugging Face caption tokenizer
    vq_dir: str = ""  # source=shards: directory of trained feature codebooks ("" = no feature modalities)
    num_workers: int = 0  # loader worker processes per rank (0: load in the training process)
    num_samples: int = 512  # source=procedural: size of the dataset
    image_size: int = 64  # source=procedural: side of the generated images, in pixels
    token_budget: int = 1024  # tokens per packed micro-batch (static shape)
    condition_mode_2d: Literal["vae", "vit", "both"] = "both"  # how a 2D condition enters
    max_conditions: int = 3  # at most this many condition modalities per document
    condition_dropout: float = 0.0  # probability that a document keeps no condition (classifier-free guidance)
    target_weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.0, "rgb": 1.0})  # target sampling
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 1234  # seed of the data order and of every per-sample random choice
    max_image_pixels: int = 1 << 26  # source=shards: an image whose header claims more pixels is skipped undecoded
    max_array_bytes: int = 1 << 30  # source=shards: a .npy (by its header) or tar member larger than this is skipped unread


# ----------------------------------------------------------------------------- training


@dataclass
class TimestepConfig:
    """The flow-matching time sampler; t = 1 is pure noise (BAGEL's convention)."""

    sampler: Literal["uniform", "logit_normal"] = "uniform"  # MODUS trains uniform t
    logit_mean: float = 0.0  # mean of the normal before the sigmoid (logit_normal)
    logit_std: float = 1.0  # std of the normal before the sigmoid (logit_normal)
    shift: float = 1.0  # t <- s*t / (1 + (s-1)*t); 1 disables the shift


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then a constant or cosine schedule."""

    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # floor of the cosine schedule
    warmup_steps: int = 0  # linear warm-up length
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    weight_decay: float = 0.0  # decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam betas
    eps: float = 1e-8  # Adam epsilon (BAGEL: 1e-15 at bf16)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class Float8Config:
    """FP8 compute of the MoT linears (``training.precision = "fp8"``); weights, gradients and Adam stay high precision."""

    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"  # torchao dynamic scaling: one scale per tensor, or per row (power-of-2 scales, e4m3 gradients; gw_hp: weight gradient in bf16)
    emulate: bool = False  # torchao: dequantize and multiply in fp32 instead of torch._scaled_mm (for GPUs without FP8 units)
    te_recipe: Literal["delayed", "current"] = "delayed"  # parallel.tp_backend=te: scales from an amax history (checkpointed) or from each tensor's current amax
    amax_history_len: int = 1024  # te_recipe=delayed: steps of amax history kept per tensor


@dataclass
class TrainingConfig:
    """The training loop: steps, batch, losses, logging."""

    steps: int = 100  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0  # seed of weights init and noise
    ce_weight: float = 1.0  # weight of the 1D cross-entropy in the total loss
    mse_weight: float = 1.0  # weight of the 2D flow-matching MSE in the total loss
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 1  # steps between log lines
    eval_every: int = 0  # steps between validation losses on data.val_shards (and one at the end); 0 = never
    eval_batches: int = 1  # micro-batches read from each held-out shard per validation (training/validation.py)
    checkpoint_every: int = 0  # steps between checkpoints in run_dir/checkpoints; 0: only at the end and on SIGTERM/SIGUSR1
    sample_every: int = 0  # >= 0 steps between held-out samples (run_dir/samples/step_*.png, wandb; tp = pp = 1); 0: off
    resume: Literal[True, False, "fallback"] = True  # continue from run_dir/checkpoints/latest when it exists; "fallback": from the newest complete tag when latest's is damaged
    keep_last: int = 0  # checkpoint tags kept (the newest, latest's included); older ones are deleted once a newer one is verified; 0 keeps all
    keep_every: int = 0  # also keep every tag whose step is a multiple of this (milestones) beyond keep_last; 0: none
    run_dir: str = "runs/default"  # outputs: resolved config, metrics.jsonl, loss curve
    ema_decay: float = 0.0  # fp32 EMA of the trainable weights, saved in checkpoints; 0 disables (BAGEL: 0.9999)
    max_bad_steps: int = 5  # a non-finite (NaN/Inf) loss or gradient skips the step; this many in a row stop the run
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"  # compute precision; auto: bf16 on GPU, fp32 on CPU; fp8: bf16 with FP8 MoT linears (training.fp8)
    fp8: Float8Config = field(default_factory=Float8Config)  # the FP8 recipe, used when precision = "fp8"
    peak_tflops: float = 0.0  # dense peak TFLOP/s of one accelerator at the compute dtype, for MFU (H100 SXM bf16: 989); 0: no MFU
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: $WANDB_MODE, else online if WANDB_API_KEY is set, else offline
    wandb_project: str = "modus"  # wandb project of the run
    wandb_run_name: str = ""  # wandb run name; "" = the name of training.run_dir


@dataclass
class ParallelConfig:
    """Parallel layout; dp is derived as world_size / (tp * pp)."""

    tp: int = 1  # tensor-parallel degree; must divide the head counts
    pp: int = 1  # pipeline-parallel degree; must divide num_layers
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-3); 2 and 3 only with pp = 1
    tp_backend: Literal["local", "te"] = "local"  # TP layers: Megatron-core ("local") or Transformer Engine (GPU)
    sequence_parallel: bool = False  # tp > 1: also split the residual stream (norms, residual adds) along tokens over tp
    collective_timeout_s: int = 600  # a collective waiting longer than this ends the job (dead rank)
    recompute: Literal["none", "full"] = "none"  # activation recomputation: "full" keeps each layer's input only and reruns the layer in backward
    recompute_layers: int = 0  # with recompute=full: the first N decoder layers are recomputed (0 = all); ViT layers always all


@dataclass
class InitConfig:
    """Where a fresh run's weights come from; a resumed run takes its checkpoint's instead."""

    bagel_dir: str = ""  # BAGEL-7B-MoT release to start from (model and VAE); "" = the seeded init (training.seed)
    seed: int = 0  # seed of the new vocabulary rows appended to BAGEL's (convert/source.py, extend_vocab_rows)


# Files a BAGEL release directory must hold (convert/bagel.py reads them).
BAGEL_RELEASE_FILES = ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json")


@dataclass
class ModusConfig:
    """Root of the run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ModusConfig:
    """Read ``path`` (JSON) over its bases, apply ``a.b=c`` overrides, validate, and return the tree.

    A file may start from another with ``"base": "tiny.json"`` (a path relative to the
    file): its values are merged over the base's, objects key by key, anything else
    (numbers, strings, lists, null) replaced whole. Bases chain; overrides apply last.
    """
    path = Path(path)
    raw, files = _read_with_bases(path, referrers=())
    for item in overrides:
        _apply_override(raw, item, path)
    source = str(path) if len(files) == 1 else f"{path} (bases: {', '.join(map(str, files[1:]))})"
    config = _build(ModusConfig, raw, source=source, prefix="")
    validate(config, source=source)
    return config


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ModusConfig:
    """Build and validate a config from a plain dict (tests, checkpoints)."""
    config = _build(ModusConfig, raw, source=source, prefix="")
    validate(config, source=source)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-ready data (what ``save_config`` writes)."""
    return dataclasses.asdict(config)


def save_config(config: ModusConfig, path: str | Path) -> None:
    """Write the resolved config as JSON, atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    tmp.replace(path)


def _read_json(path: Path, referrer: Path | None) -> dict[str, Any]:
    """The JSON object in ``path``; ``referrer`` is the file naming it as its base, if any."""
    if referrer is None:
        what, fix = f"config file {path}", "pass --config with a path such as configs/tiny.json"
    else:
        what, fix = f"config file {path} (the base of {referrer})", "fix the base path, which is relative to the file naming it"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} does not exist; {fix}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}")
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _read_with_bases(path: Path, referrers: tuple[Path, ...]) -> tuple[dict[str, Any], list[Path]]:
    """``path``'s values merged over its base chain's, and the files read (``path`` first)."""
    raw = _read_json(path, referrers[-1] if referrers else None)
    base = raw.pop("base", None)
    if base is None:
        return raw, [path]
    if not isinstance(base, str):
        raise ValueError(f"config file {path}: base = {base!r} must be a path relative to the file, e.g. \"tiny.json\"")
    chain = (*referrers, path)
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in chain}:
        cycle = " -> ".join(map(str, (*chain, base_path)))
        raise ValueError(f"config file {path}: base {base!r} closes a cycle ({cycle}); remove one of these base keys")
    base_raw, base_files = _read_with_bases(base_path, chain)
    return _merge(base_raw, raw), [path, *base_files]


def _merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: objects merge key by key, any other value replaces.

    A merged object lists the base's other keys first, then ``over``'s in ``over``'s order:
    the order of a map such as ``data.target_weights`` is the order its targets are drawn in.
    """
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    kept = {key: value for key, value in base.items() if key not in over}
    return {**kept, **{key: _merge(base.get(key), value) for key, value in over.items()}}


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> None:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form a.b=c (e.g. training.steps=10)")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {key!r} is not a section in {path}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # bare strings need no quotes: data.source=procedural
    node[keys[-1]] = value


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: {prefix or 'the top level'} must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix or "the top level"
        raise ValueError(
            f"{source}: unknown key {prefix + unknown[0]!r} in {where}; "
            f"valid keys are {sorted(fields)}. Remove or rename it."
        )
    kwargs = {name: _coerce(hints[name], raw[name], source, prefix + name) for name in raw}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{source}: {key} = {value!r} is not one of {list(choices)}")
        return value
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be an object, got {value!r}")
        return {_coerce(key_hint, k, source, f"{key}.{k}"): _coerce(value_hint, v, source, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(item_hint, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None) and value is None:
                return None
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        return _coerce(options[0], value, source, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ValueError(f"{source}: {key} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric config field: ``lo <= v <= hi`` (``<`` where the bound is open)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False  # lo itself is invalid
    hi_open: bool = False  # hi itself is invalid

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self) -> str:
        """``of at least 1``, ``in [0, 1)``, ``greater than 0``: completes "set it to a value ..."."""
        if math.isinf(self.lo) and math.isinf(self.hi):
            return "that is finite"
        if math.isinf(self.hi):
            return f"greater than {self.lo:g}" if self.lo_open else f"of at least {self.lo:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"

    def invalid_examples(self, is_int: bool) -> list[float]:
        """Values outside the range (the bounds' neighbours; NaN and infinity for a float field)."""
        step = 1 if is_int else 1e-3
        below = [self.lo if self.lo_open else self.lo - step] if math.isfinite(self.lo) else []
        above = [self.hi if self.hi_open else self.hi + step] if math.isfinite(self.hi) else []
        return below + above + ([] if is_int else [math.nan, math.inf, -math.inf])


_POSITIVE_INT, _NON_NEGATIVE, _POSITIVE, _FINITE = Range(1), Range(0), Range(0, lo_open=True), Range()
_FRACTION, _DECAY = Range(0, 1), Range(0, 1, hi_open=True)
_SEED = Range(0, 2**63 - 1)  # torch generators take 64-bit seeds

# Every numeric field of the tree and its valid range. A list's items are ``key[]``, a map's
# values ``key.*``. tests/test_config.py walks the dataclasses and fails for a numeric field
# missing here, so a new field cannot skip validation. Floats must also be finite.
FIELD_RANGES: dict[str, Range] = {
    **{f"model.llm.{k}": _POSITIVE_INT for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")},
    "model.llm.rope_theta": _POSITIVE,
    "model.llm.rms_norm_eps": _POSITIVE,
    "model.llm.init_std": _NON_NEGATIVE,
    **{f"model.vit.{k}": _POSITIVE_INT for k in (
        "hidden_size", "intermediate_size", "num_heads", "num_layers", "patch_size", "max_patches_per_side",
        "num_channels")},
    "model.vit.select_layer": Range(-1024, 1024),  # and it must select a layer of model.vit.num_layers (below)
    "model.vit.layer_norm_eps": _POSITIVE,
    **{f"model.vae.{k}": _POSITIVE_INT for k in (
        "latent_channels", "base_channels", "channel_multipliers[]", "num_res_blocks", "norm_groups", "in_channels")},
    "model.vae.scale_factor": _POSITIVE,
    "model.vae.shift_factor": _FINITE,
    "model.vocab.text_vocab_size": _POSITIVE_INT,
    "model.vocab.vision_start_id": _NON_NEGATIVE,
    "model.vocab.vision_end_id": _NON_NEGATIVE,
    "model.vocab.coordinate_bins": _POSITIVE_INT,
    "model.vocab.codebook_size": _POSITIVE_INT,
    "model.vocab.vocab_multiple": _POSITIVE_INT,
    "model.latent_patch_size": _POSITIVE_INT,
    "model.max_latent_size": _POSITIVE_INT,
    "model.timestep_frequency_dim": Range(2),
    "data.num_workers": _NON_NEGATIVE,
    "data.num_samples": _POSITIVE_INT,
    "data.image_size": _POSITIVE_INT,
    "data.token_budget": Range(16),
    "data.max_conditions": _NON_NEGATIVE,
    "data.condition_dropout": _FRACTION,
    "data.target_weights.*": _NON_NEGATIVE,
    "data.augment.crop_min_side": Range(0, 1, lo_open=True),
    "data.augment.max_pixels": _POSITIVE_INT,
    "data.max_image_pixels": _POSITIVE_INT,
    "data.max_array_bytes": _POSITIVE_INT,
    "data.seed": _SEED,
    "training.steps": _POSITIVE_INT,
    "training.grad_accum_steps": _POSITIVE_INT,
    "training.seed": _SEED,
    "training.ce_weight": _NON_NEGATIVE,
    "training.mse_weight": _NON_NEGATIVE,
    "training.timesteps.logit_mean": _FINITE,
    "training.timesteps.logit_std": _POSITIVE,
    "training.timesteps.shift": _POSITIVE,
    "training.optim.lr": _POSITIVE,
    "training.optim.min_lr": _NON_NEGATIVE,  # and at most lr (below)
    "training.optim.warmup_steps": _NON_NEGATIVE,
    "training.optim.weight_decay": _NON_NEGATIVE,
    "training.optim.betas[]": _DECAY,
    "training.optim.eps": _POSITIVE,
    "training.optim.grad_clip": _NON_NEGATIVE,
    "training.log_every": _POSITIVE_INT,
    "training.checkpoint_every": _NON_NEGATIVE,
    "training.ema_decay": _DECAY,
    "training.max_bad_steps": _POSITIVE_INT,
    "training.peak_tflops": _NON_NEGATIVE,
    "training.keep_last": _NON_NEGATIVE,
    "training.sample_every": _NON_NEGATIVE,
    "training.eval_every": _NON_NEGATIVE,
    "training.eval_batches": _POSITIVE_INT,
    "training.keep_every": _NON_NEGATIVE,
    "training.fp8.amax_history_len": _POSITIVE_INT,
    "parallel.tp": _POSITIVE_INT,
    "parallel.pp": _POSITIVE_INT,
    "parallel.zero_stage": Range(0, 3),
    "parallel.collective_timeout_s": _POSITIVE_INT,
    "parallel.recompute_layers": _NON_NEGATIVE,
    "init.seed": _SEED,
}  # fmt: skip
# Fixed-length lists: key -> items.
FIELD_LENGTHS = {"training.optim.betas": 2}
# Strings that must not be empty, and why.
NON_EMPTY_STRINGS = {
    "training.run_dir": "every output (checkpoints, metrics) goes there; e.g. runs/my_run",
    "training.wandb_project": "the wandb project of the run, e.g. modus",
}


def numeric_field_patterns(cls: type = ModusConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """Every numeric field of the dataclass tree ``cls`` as (``FIELD_RANGES`` key, int or float), from the types."""
    for name, hint in typing.get_type_hints(cls).items():
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            yield from numeric_field_patterns(hint, key + ".")
            continue
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is list:
            key, args = key + "[]", args
        elif origin is dict:
            key, args = key + ".*", args[1:]
        elif origin in (typing.Union, types.UnionType):
            args = tuple(a for a in args if a is not type(None))
        else:
            args = (hint,)
        numeric = [a for a in args if a in (int, float)]
        if numeric:
            yield key, numeric[0]


def _numeric_values(node: Any, prefix: str = "") -> Iterator[tuple[str, str, int | float]]:
    """Every numeric value in the config tree as (key to report, ``FIELD_RANGES`` key, value)."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_values(value, key + ".")
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", key + "[]", v) for i, v in enumerate(value) if _is_number(v))
        elif isinstance(value, dict):
            yield from ((f"{key}.{k}", key + ".*", v) for k, v in value.items() if _is_number(v))
        elif _is_number(value):
            yield key, key, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ranges(config: ModusConfig, source: str) -> None:
    """Every numeric field within its ``FIELD_RANGES`` row, fixed-length lists, non-empty strings."""
    for key, pattern, value in _numeric_values(config):
        if pattern not in FIELD_RANGES:  # a number in a field that takes none (e.g. training.resume = 1)
            raise ValueError(f"{source}: {key} = {value!r} is not a valid value; see the field's comment in modus_mega/config.py")
        valid = FIELD_RANGES[pattern]
        if value not in valid:
            raise ValueError(
                f"{source}: {key} = {value!r} is out of range; set it to a value {valid.describe()}"
            )
    for key, length in FIELD_LENGTHS.items():
        value = _get(config, key)
        if len(value) != length:
            raise ValueError(f"{source}: {key} = {value!r} must have exactly {length} items, e.g. [0.9, 0.95]")
    for key, why in NON_EMPTY_STRINGS.items():
        if not _get(config, key).strip():
            raise ValueError(f"{source}: {key} is empty; give it a value ({why})")
    if len(config.model.vae.channel_multipliers) < 1:
        raise ValueError(f"{source}: model.vae.channel_multipliers is empty; FLUX uses [1, 2, 4, 4]")


def _get(config: ModusConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(config: ModusConfig, source: str = "<config>") -> None:
    """Check every field's range, then cross-field consistency; raise ``ValueError`` with the key, file and fix."""
    _check_ranges(config, source)
    llm, vit, par = config.model.llm, config.model.vit, config.parallel

    def fail(key: str, msg: str) -> None:
        raise ValueError(f"{source}: {key}: {msg}")

    if llm.num_heads % llm.num_kv_heads:
        fail("model.llm.num_kv_heads", f"{llm.num_kv_heads} does not divide num_heads={llm.num_heads}; pick a divisor")
    if llm.head_dim % 2:
        fail("model.llm.head_dim", f"{llm.head_dim} must be even for RoPE")
    if llm.hidden_size % 4:
        fail("model.llm.hidden_size", "must be a multiple of 4 for the 2D sin-cos position tables")
    if vit.hidden_size % vit.num_heads:
        fail("model.vit.num_heads", f"{vit.num_heads} does not divide model.vit.hidden_size={vit.hidden_size}")
    if not 1 <= vit.num_layers_used <= vit.num_layers:
        fail("model.vit.select_layer", f"{vit.select_layer} selects no layer of {vit.num_layers}")
    if llm.num_kv_heads % par.tp:
        fail(
            "parallel.tp",
            f"tp={par.tp} must divide model.llm.num_kv_heads={llm.num_kv_heads} (KV heads are split, not "
            "replicated, across tensor-parallel ranks); use a divisor, or more data or pipeline parallelism",
        )
    if par.pp > 1 and llm.tie_word_embeddings:
        fail("model.llm.tie_word_embeddings", "tied embeddings cannot be split across pipeline stages; untie them or use pp = 1")
    if llm.num_heads % par.tp:
        fail("parallel.tp", f"tp={par.tp} does not divide model.llm.num_heads={llm.num_heads}; use a divisor")
    if llm.intermediate_size % par.tp:
        fail("parallel.tp", f"tp={par.tp} does not divide model.llm.intermediate_size={llm.intermediate_size}")
    if llm.num_layers % par.pp:
        fail("parallel.pp", f"pp={par.pp} does not divide model.llm.num_layers={llm.num_layers}")
    if par.pp > 1 and par.zero_stage > 1:
        fail(
            "parallel.zero_stage",
            f"ZeRO-{par.zero_stage} cannot be combined with pipeline parallelism (pp={par.pp}): DeepSpeed's "
            "pipeline engine supports ZeRO 0 and 1 only. Use zero_stage 1 with pp > 1, or pp = 1 for ZeRO 2/3.",
        )
    if par.sequence_parallel and par.tp == 1:
        fail(
            "parallel.sequence_parallel",
            "splits the residual stream over the tensor-parallel ranks and needs tp > 1; set it false or raise parallel.tp",
        )
    from modus_mega.modalities import MODALITY_NAMES  # local import: modalities imports nothing from here

    data = config.data
    for name in data.target_weights:
        if name not in MODALITY_NAMES:
            fail(f"data.target_weights.{name}", f"unknown modality {name!r}; valid: {list(MODALITY_NAMES)}")
    if not any(w > 0 for w in data.target_weights.values()):
        fail("data.target_weights", "must give at least one modality a positive weight")
    if data.source == "shards" and not (data.shards and data.text_tokenizer):
        fail("data.shards", "source=shards needs data.shards (a shard directory) and data.text_tokenizer")
    if data.val_shards and not data.text_tokenizer:
        fail("data.val_shards", "held-out shards are tokenized like training shards: set data.text_tokenizer too")
    if config.data.image_size % (config.model.vae.downsample * config.model.latent_patch_size):
        fail("data.image_size", "must be a multiple of the VAE downsampling times latent_patch_size")
    bagel_dir = config.init.bagel_dir
    if bagel_dir:
        missing = [name for name in BAGEL_RELEASE_FILES if not (Path(bagel_dir) / name).is_file()]
        if missing:
            fail(
                "init.bagel_dir",
                f"{bagel_dir} lacks {', '.join(missing)}; point it at a BAGEL-7B-MoT release directory "
                f"(holding {', '.join(BAGEL_RELEASE_FILES)} and the tokenizer files), or set it to \"\" to start "
                "from the seeded init",
            )
    if not 0 <= par.recompute_layers <= llm.num_layers:
        fail("parallel.recompute_layers", f"{par.recompute_layers} must lie in [0, model.llm.num_layers={llm.num_layers}] (0 = all)")
    if par.recompute == "none" and par.recompute_layers:
        fail("parallel.recompute_layers", f"{par.recompute_layers} needs parallel.recompute=full; set it to 0 or turn recompute on")
    training = config.training
    if training.precision == "fp8" and training.fp8.emulate and par.tp_backend == "te":
        fail("training.fp8.emulate", "is torchao's option; Transformer Engine (parallel.tp_backend=te) has no emulated FP8: set it false")
    if type(training.resume) not in (bool, str):  # 1 or 1.0 pass the Literal check (1 == True)
        fail("training.resume", f"{training.resume!r} must be true, false or \"fallback\"")
    optim = config.training.optim
    if optim.min_lr > optim.lr:
        fail("training.optim.min_lr", f"{optim.min_lr} exceeds training.optim.lr={optim.lr}; the floor must not exceed the peak")
    if training.eval_every > 0 and not data.val_shards:
        fail(
            "training.eval_every",
            f"{training.eval_every} needs held-out data: set data.val_shards (python -m modus_mega.datasets.synth "
            "--split val writes some) or set training.eval_every=0",
        )
