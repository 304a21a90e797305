"""BAGEL-7B-MoT's release layout in and out.

A BAGEL directory holds ``ema.safetensors`` (the model, BAGEL's key names, bf16),
``llm_config.json`` (a Qwen2 config), ``vit_config.json`` (a SigLIP vision config),
``ae.safetensors`` (the FLUX autoencoder, FLUX's names) and the Qwen2 tokenizer files.
Some of the architecture is fixed by BAGEL's loading code rather than these files, and is
checked here against the MODUS config: QK norm on, untied LM head, q/k/v biases and no
o bias (Qwen2), ``head_dim = hidden_size / num_attention_heads``, the ViT built with
``num_hidden_layers - 1`` layers (BAGEL drops the last) and a position table of
``(image_size / patch_size)^2`` rows. Latent-side constants (``max_latent_size``, latent
patch, timestep width) are checked through the shapes of the tensors that depend on them,
and the stored 2D sin-cos tables must equal the ones MODUS computes.

The vocabulary: BAGEL's embedding and LM head have ``vocab_size`` rows, MODUS's text
range; loading appends MODUS's new rows (``source.extend_vocab_rows``) and keeps BAGEL's
bit for bit. Exporting writes every row by default (``llm_config.json`` then says
``vocab_size`` = all rows and ``modus_text_vocab_size`` = the text rows; BAGEL's code
builds its tables from ``vocab_size``, so it loads the result), or only the text rows.
"""

from __future__ import annotations

import copy
import math
import operator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modus_mega.config import ModelConfig
from modus_mega.convert.files import (
    PlannedTensor,
    atomic_directory,
    cast,
    copy_tokenizer_files,
    nonfinite_fix,
    output_dtype,
    progress_bar,
    read_json,
    write_json,
    write_safetensors,
)
from modus_mega.convert.hf import DEFAULT_MAX_SHARD_BYTES, expected_shapes, write_hf
from modus_mega.convert.keymap import VAE_PREFIX, bagel_to_ours, is_vae_name, ours_to_bagel
from modus_mega.convert.source import (
    NEW_ROW_NOISE,
    FullShapeFn,
    ModuleSource,
    SafetensorsSource,
    ShardFn,
    TensorSource,
    VocabRowsSource,
    check_finite,
    check_floating,
    check_tensors,
    full_tensor,
    load_into,
    param_shape,
)
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.embeddings import sincos_2d_table
from modus_mega.model.modus import ModusModel
from modus_mega.vocab import build_vocabulary

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
SINCOS_TABLES = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")  # fixed 2D sin-cos tables
TEXT_VOCAB_KEY = "modus_text_vocab_size"  # written to llm_config.json when it carries MODUS's extra rows
BAGEL_VIT_DROPPED_LAYERS = 1  # BAGEL's loader builds vit_config.num_hidden_layers - 1 layers

# Defaults of BAGEL's Qwen2Config and SiglipVisionConfig: what BAGEL's code uses for an absent key.
_QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
}
_SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
# JSON key <-> MODUS config field, copied as they are (both directions).
_LLM_FIELDS = (
    ("hidden_size", "llm.hidden_size"),
    ("num_hidden_layers", "llm.num_layers"),
    ("num_attention_heads", "llm.num_heads"),
    ("num_key_value_heads", "llm.num_kv_heads"),
    ("intermediate_size", "llm.intermediate_size"),
    ("rope_theta", "llm.rope_theta"),
    ("rms_norm_eps", "llm.rms_norm_eps"),
)
_VIT_FIELDS = (
    ("hidden_size", "vit.hidden_size"),
    ("intermediate_size", "vit.intermediate_size"),
    ("num_attention_heads", "vit.num_heads"),
    ("patch_size", "vit.patch_size"),
    ("layer_norm_eps", "vit.layer_norm_eps"),
    ("num_channels", "vit.num_channels"),
)
# What BAGEL's code fixes regardless of the JSON files: MODUS field -> (value, why).
_FIXED_BY_BAGEL = {
    "llm.qk_norm": (True, "BAGEL's loader sets llm_config.qk_norm = True"),
    "llm.tie_word_embeddings": (False, "BAGEL's loader sets llm_config.tie_word_embeddings = False"),
    "llm.qkv_bias": (True, "Qwen2's q/k/v projections carry biases"),
    "llm.o_bias": (False, "Qwen2's o projection has no bias"),
}


# ----------------------------------------------------------------------------- configs


def read_bagel_configs(bagel_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``llm_config.json`` and ``vit_config.json`` of a BAGEL directory, with BAGEL's defaults filled in."""
    bagel_dir = Path(bagel_dir)
    llm = {**_QWEN2_DEFAULTS, **read_json(bagel_dir / LLM_CONFIG_FILE, "BAGEL's Qwen2 config")}
    vit = {**_SIGLIP_DEFAULTS, **read_json(bagel_dir / VIT_CONFIG_FILE, "BAGEL's SigLIP config")}
    if llm["num_key_value_heads"] is None:  # Qwen2Config: None means one KV head per query head
        llm["num_key_value_heads"] = llm["num_attention_heads"]
    return llm, vit


def _bagel_fields(llm: dict[str, Any], vit: dict[str, Any], bagel_dir: Path) -> dict[str, tuple[Any, str]]:
    """MODUS config field -> (value implied by BAGEL's files, where it comes from)."""
    llm_file, vit_file = bagel_dir / LLM_CONFIG_FILE, bagel_dir / VIT_CONFIG_FILE
    if llm["hidden_act"] != "silu" or llm["rope_scaling"] is not None:
        raise ValueError(
            f"{llm_file}: hidden_act={llm['hidden_act']!r}, rope_scaling={llm['rope_scaling']!r}; MODUS's decoder is "
            "SwiGLU with plain RoPE (hidden_act 'silu', rope_scaling null), as BAGEL-7B-MoT"
        )
    if vit["hidden_act"] != "gelu_pytorch_tanh":
        raise ValueError(f"{vit_file}: hidden_act={vit['hidden_act']!r}; MODUS's ViT uses 'gelu_pytorch_tanh' (SigLIP)")
    for file, config, num, den in (
        (llm_file, llm, "hidden_size", "num_attention_heads"),
        (vit_file, vit, "image_size", "patch_size"),
    ):
        if config[num] % config[den]:
            raise ValueError(f"{file}: {num}={config[num]} is not a multiple of {den}={config[den]}")
    fields = {ours: (llm[key], f"{llm_file}: {key} = {llm[key]!r}") for key, ours in _LLM_FIELDS}
    fields.update({ours: (vit[key], f"{vit_file}: {key} = {vit[key]!r}") for key, ours in _VIT_FIELDS})
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    fields["llm.head_dim"] = (head_dim, f"{llm_file}: hidden_size / num_attention_heads = {head_dim}")
    text_rows = llm.get(TEXT_VOCAB_KEY, llm["vocab_size"])
    text_key = TEXT_VOCAB_KEY if TEXT_VOCAB_KEY in llm else "vocab_size"
    fields["vocab.text_vocab_size"] = (text_rows, f"{llm_file}: {text_key} = {text_rows}")
    layers = vit["num_hidden_layers"] - BAGEL_VIT_DROPPED_LAYERS
    fields["vit.num_layers_used"] = (layers, f"{vit_file}: num_hidden_layers - 1 = {layers} (BAGEL drops one layer)")
    side = vit["image_size"] // vit["patch_size"]
    fields["vit.max_patches_per_side"] = (side, f"{vit_file}: image_size / patch_size = {side}")
    return fields


def bagel_model_config(bagel_dir: str | Path, base: ModelConfig) -> ModelConfig:
    """``base`` with every field BAGEL's files (and code) determine taken from ``bagel_dir``.

    MODUS-only fields (the new vocabulary tokens, VAE, latent geometry, ...) stay as in
    ``base``. The result passes ``check_bagel_config`` by construction.
    """
    llm, vit = read_bagel_configs(bagel_dir)
    cfg = copy.deepcopy(base)
    for field, (value, _) in _bagel_fields(llm, vit, Path(bagel_dir)).items():
        if field == "vit.num_layers_used":
            cfg.vit.num_layers, cfg.vit.select_layer = value + BAGEL_VIT_DROPPED_LAYERS, -1 - BAGEL_VIT_DROPPED_LAYERS
        else:
            section, key = field.split(".")
            setattr(getattr(cfg, section), key, value)
    for field, (value, _) in _FIXED_BY_BAGEL.items():
        section, key = field.split(".")
        setattr(getattr(cfg, section), key, value)
    return cfg


def _check_fixed_by_bagel(cfg: ModelConfig) -> None:
    for field, (value, why) in _FIXED_BY_BAGEL.items():
        ours = operator.attrgetter(field)(cfg)
        if ours != value:
            raise ValueError(f"model.{field} = {ours!r}, but BAGEL needs {value!r} ({why}); set it to {value!r}")
    if cfg.llm.head_dim * cfg.llm.num_heads != cfg.llm.hidden_size:
        raise ValueError(
            f"model.llm.head_dim = {cfg.llm.head_dim}, but BAGEL's Qwen2 attention derives head_dim = hidden_size / "
            f"num_heads = {cfg.llm.hidden_size // cfg.llm.num_heads}; set model.llm.head_dim to that"
        )


def check_bagel_config(cfg: ModelConfig, bagel_dir: str | Path) -> None:
    """Refuse ``cfg`` unless it describes the model of the BAGEL checkpoint in ``bagel_dir``.

    The error names the JSON key and value and the MODUS config field and value.
    """
    _check_fixed_by_bagel(cfg)
    llm, vit = read_bagel_configs(bagel_dir)
    for field, (value, origin) in _bagel_fields(llm, vit, Path(bagel_dir)).items():
        ours = operator.attrgetter(field)(cfg)
        if ours != value:
            raise ValueError(
                f"{origin}, but the model config has model.{field} = {ours!r}; use the config that matches the "
                "checkpoint (configs/7b.json for BAGEL-7B-MoT) or fix that field"
            )


def bagel_json_configs(cfg: ModelConfig, vocab_rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``llm_config.json`` and ``vit_config.json`` for a BAGEL export of ``cfg`` with ``vocab_rows`` rows."""
    _check_fixed_by_bagel(cfg)
    llm_json: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        **{key: operator.attrgetter(field)(cfg) for key, field in _LLM_FIELDS},
        "rope_scaling": None,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "qk_norm": True,
        "layer_module": "Qwen2MoTDecoderLayer",
    }
    if vocab_rows != cfg.vocab.text_vocab_size:
        llm_json[TEXT_VOCAB_KEY] = cfg.vocab.text_vocab_size
    vit_json = {
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        **{key: operator.attrgetter(field)(cfg) for key, field in _VIT_FIELDS},
        "num_hidden_layers": cfg.vit.num_layers_used + BAGEL_VIT_DROPPED_LAYERS,
        "image_size": cfg.vit.max_patches_per_side * cfg.vit.patch_size,
    }
    return llm_json, vit_json


# ----------------------------------------------------------------------------- tensors


class BagelSource(TensorSource):
    """The tensors of a BAGEL directory under MODUS names: ``ema.safetensors``, and ``ae.safetensors`` as ``vae.*``.

    A key of ``ema.safetensors`` that the key map does not know is refused when opening.
    Vocabulary tensors keep their stored row count (wrap in ``VocabRowsSource`` to extend).
    """

    def __init__(self, bagel_dir: str | Path, with_vae: bool = True) -> None:
        bagel_dir = Path(bagel_dir)
        self.label = str(bagel_dir)
        self._ema = SafetensorsSource([bagel_dir / EMA_FILE])
        self._ae: SafetensorsSource | None = None
        self._stored: dict[str, tuple[SafetensorsSource, str]] = {}
        try:
            if with_vae:
                self._ae = SafetensorsSource([bagel_dir / AE_FILE])
            for stored in self._ema.names():
                try:
                    self._stored[bagel_to_ours(stored)] = (self._ema, stored)
                except KeyError as e:
                    raise ValueError(f"{bagel_dir / EMA_FILE} holds {stored!r}, unknown to MODUS: {e.args[0]}") from e
            for stored in self._ae.names() if self._ae is not None else ():
                self._stored[VAE_PREFIX + stored] = (self._ae, stored)
        except BaseException:
            self.close()
            raise

    def names(self) -> list[str]:
        return list(self._stored)

    def __contains__(self, name: object) -> bool:
        return name in self._stored

    def shape(self, name: str) -> torch.Size:
        source, stored = self._stored[name]
        return source.shape(stored)

    def dtype(self, name: str) -> torch.dtype:
        source, stored = self._stored[name]
        return source.dtype(stored)

    def lazy(self, name: str) -> Any:
        source, stored = self._stored[name]
        return source.lazy(stored)

    def read(self, name: str) -> torch.Tensor:
        source, stored = self._stored[name]
        return source.read(stored)

    def describe(self, name: str) -> str:
        if is_vae_name(name):
            return f"{name!r} (stored as {name[len(VAE_PREFIX):]!r} in {Path(self.label) / AE_FILE})"
        try:
            stored = ours_to_bagel(name)
        except KeyError:
            return f"{name!r} in {self.label}"
        return f"{name!r} (stored as {stored!r} in {Path(self.label) / EMA_FILE})"

    def close(self) -> None:
        self._ema.close()
        if self._ae is not None:
            self._ae.close()


def check_sincos_tables(source: TensorSource) -> None:
    """Refuse a checkpoint whose fixed 2D sin-cos tables differ from the ones MODUS computes.

    BAGEL stores its latent and ViT position tables; they must equal ``sincos_2d_table``
    up to bf16 rounding (the release's dtype; a table that went through bf16 once, e.g. a
    release trained on and exported in fp32, keeps that rounding in any wider dtype). A
    difference means another table convention (row/column order, interpolated positions)
    or another table side than the model config's, which would silently move every image
    token: errors of order one, far above the rounding.
    """
    for name in SINCOS_TABLES:
        if name not in source:
            continue  # reported as missing by the load
        rows, dim = source.shape(name)
        side = math.isqrt(rows)
        stored = source.read(name)
        error = (stored.double() - sincos_2d_table(side, dim)).abs().max().item() if side * side == rows else math.inf
        if error > max(torch.finfo(stored.dtype).eps, torch.finfo(torch.bfloat16).eps):
            raise ValueError(
                f"{source.describe(name)} differs from MODUS's 2D sin-cos table of side {side} by up to {error:.3g}; "
                "the checkpoint uses another position-table convention (DESIGN §1: row r*S + c is "
                "[sin(c w), cos(c w), sin(r w), cos(r w)]) and cannot be loaded as BAGEL-7B-MoT"
            )


def load_bagel_into(
    model: nn.Module,
    vae: FluxAutoEncoder | None,
    bagel_dir: str | Path,
    cfg: ModelConfig | None = None,
    seed: int = 0,
    noise: float = NEW_ROW_NOISE,
    shard: ShardFn = full_tensor,
    full_shape: FullShapeFn = param_shape,
    prefix: str = "",
    allow_unused: bool = False,
    progress: bool = False,
) -> None:
    """Load a BAGEL release into ``model`` (and ``vae``), tensor by tensor.

    ``cfg`` (default ``model.cfg``) is checked against BAGEL's JSON files first, and the
    stored sin-cos tables against MODUS's (``check_sincos_tables``). The embedding and LM
    head get BAGEL's rows bit for bit, then MODUS's new rows by
    ``source.extend_vocab_rows`` seeded by ``seed``. ``shard`` / ``full_shape`` are the
    per-parameter hooks of a sharded model (``source.load_into``); ``prefix`` and
    ``allow_unused`` let a pipeline stage load only the modules it holds.
    """
    cfg = cfg if cfg is not None else model.cfg
    check_bagel_config(cfg, bagel_dir)
    vocab = build_vocabulary(cfg.vocab)
    modules: dict[str, nn.Module] = {prefix: model}
    if vae is not None:
        modules[VAE_PREFIX] = vae
    with BagelSource(bagel_dir, with_vae=vae is not None) as source:
        check_sincos_tables(source)
        rows = VocabRowsSource(source, vocab.padded_size, cfg.vocab.text_vocab_size, seed, noise)
        load_into(modules, rows, shard=shard, full_shape=full_shape, allow_unused=allow_unused, progress=progress)


def load_bagel_vae(vae: FluxAutoEncoder, bagel_dir: str | Path) -> None:
    """Load only the release's autoencoder (``ae.safetensors``) into ``vae``.

    For a run that resumes from its own checkpoint: the VAE is frozen and not part of the
    DeepSpeed checkpoint, so it comes from the release every time the run starts.
    """
    with BagelSource(bagel_dir, with_vae=True) as source:
        load_into({VAE_PREFIX: vae}, source, allow_unused=True)


def import_bagel(
    bagel_dir: str | Path,
    cfg: ModelConfig,
    out: str | Path,
    seed: int = 0,
    noise: float = NEW_ROW_NOISE,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Convert a BAGEL release into a MODUS checkpoint (Hugging Face layout) at ``out``.

    The vocabulary is extended exactly as ``load_bagel_into`` does, so loading either gives
    the same weights. Tokenizer files are copied.
    """
    check_bagel_config(cfg, bagel_dir)
    vocab = build_vocabulary(cfg.vocab)
    with BagelSource(bagel_dir) as source:
        check_sincos_tables(source)
        rows = VocabRowsSource(source, vocab.padded_size, cfg.vocab.text_vocab_size, seed, noise)
        return write_hf(
            rows, cfg, out, dtype, max_shard_bytes, tokenizer_dir=bagel_dir, overwrite=overwrite, progress=progress,
            allow_nonfinite=allow_nonfinite,
        )  # fmt: skip


def write_bagel(
    source: TensorSource,
    cfg: ModelConfig,
    out: str | Path,
    dtype: torch.dtype | None = None,
    text_vocab_only: bool = False,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``source`` (MODUS names, VAE included) in BAGEL's release layout at ``out``, atomically.

    ``dtype`` casts the tensors of ``ema.safetensors`` (the VAE keeps its dtype, as FLUX
    ships it). With ``text_vocab_only`` the embedding and LM head keep only the pretrained
    text rows (BAGEL's own row count); by default every row is kept. Non-floating tensors
    (without ``dtype``; in the VAE always) and, unless ``allow_nonfinite``, tensors holding
    NaN or Inf are refused, as ``write_hf`` does.
    """
    vocab = build_vocabulary(cfg.vocab)
    rows = cfg.vocab.text_vocab_size if text_vocab_only else vocab.padded_size
    llm_json, vit_json = bagel_json_configs(cfg, rows)
    check_tensors(expected_shapes(cfg, with_vae=True), source)
    check_floating(source, [n for n in source.names() if not is_vae_name(n)], dtype)
    check_floating(source, [n for n in source.names() if is_vae_name(n)], None)
    fix = nonfinite_fix(allow_nonfinite)
    resized = VocabRowsSource(source, rows, cfg.vocab.text_vocab_size)

    def produce(item: PlannedTensor) -> torch.Tensor:
        tensor = resized.lazy(item.source_name)[:]
        return cast(tensor if fix is None else check_finite(tensor, resized.describe(item.source_name), fix), item.dtype)

    ema_plan, ae_plan = [], []
    for name in resized.names():
        if is_vae_name(name):
            ae_plan.append(PlannedTensor(name[len(VAE_PREFIX) :], name, resized.shape(name), resized.dtype(name)))
        else:
            out_dtype = output_dtype(resized.dtype(name), dtype)
            ema_plan.append(PlannedTensor(ours_to_bagel(name), name, resized.shape(name), out_dtype))
    total = sum(item.nbytes for item in ema_plan + ae_plan)
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp, progress_bar(total, f"write {out.name}", progress) as bar:
        for file, plan in ((EMA_FILE, ema_plan), (AE_FILE, ae_plan)):
            write_safetensors(
                tmp / file,
                plan,
                produce,
                on_bytes=bar.update,
            )
        write_json(tmp / LLM_CONFIG_FILE, llm_json)
        write_json(tmp / VIT_CONFIG_FILE, vit_json)
        copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir is not None else None, tmp)
    return out


def save_bagel(
    model: ModusModel,
    vae: FluxAutoEncoder,
    out: str | Path,
    dtype: torch.dtype | None = None,
    text_vocab_only: bool = False,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write an in-memory model and VAE in BAGEL's release layout; see ``write_bagel``."""
    source = ModuleSource({"": model, VAE_PREFIX: vae})
    return write_bagel(source, model.cfg, out, dtype, text_vocab_only, tokenizer_dir, overwrite, progress)
