"""The model settings a BAGEL release determines, read from the release itself.

A release directory holds ``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP), the
tokenizer files, ``ema.safetensors`` and ``ae.safetensors``. Together with what BAGEL's and
FLUX's code fix regardless of those files, they determine most of the MODUS model config:

- the decoder and ViT shapes from the two JSON files (with BAGEL's defaults for absent keys);
  ``head_dim = hidden_size / num_attention_heads``, the ViT's ``num_hidden_layers - 1`` layers
  and ``(image_size / patch_size)`` patches per side as BAGEL's loader builds them;
- QK norm on, untied LM head, q/k/v biases and no o bias (BAGEL's loader, Qwen2);
- the vision markers: the ids of ``<|vision_start|>`` / ``<|vision_end|>`` among the
  tokenizer's special tokens (absent: MODUS appends its own, ``null`` in the config);
- the autoencoder: FLUX's fixed settings (``FLUX_AE``: 32 norm groups, scale 0.3611, shift
  0.1159, ...), which BAGEL's code hard-codes, unless the release carries MODUS's
  ``ae_config.json`` (written by every MODUS export, so a release with another autoencoder
  says which);
- the latent geometry from tensor shapes in ``ema.safetensors`` (header only): the latent
  position table's side, the latent patch and the timestep feature width.

``release_model_config`` builds the config; ``check_bagel_config`` compares a given one
with it and reports every differing field at once, each with both values and the file it
comes from, and the ``--set`` overrides that fix them all.
"""

from __future__ import annotations

import copy
import math
import operator
from pathlib import Path
from typing import Any

from modus_mega.config import ModelConfig, config_from_dict, config_to_dict
from modus_mega.convert.files import read_json
from modus_mega.convert.source import SafetensorsSource

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
AE_CONFIG_FILE = "ae_config.json"  # MODUS's exports: the autoencoder's settings (BAGEL ships none: FLUX's)
TEXT_VOCAB_KEY = "modus_text_vocab_size"  # written to llm_config.json when it carries MODUS's extra rows
BAGEL_VIT_DROPPED_LAYERS = 1  # BAGEL's loader builds vit_config.num_hidden_layers - 1 layers
VISION_MARKERS = {"vocab.vision_start_id": "<|vision_start|>", "vocab.vision_end_id": "<|vision_end|>"}
# The FLUX.1 autoencoder as BAGEL's code builds it (AutoEncoderParams; GroupNorm(32) in every norm).
FLUX_AE: dict[str, Any] = {
    "latent_channels": 16,
    "base_channels": 128,
    "channel_multipliers": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "in_channels": 3,
    "norm_groups": 32,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}
# Tensors of ema.safetensors whose shapes fix MODUS's latent geometry (BAGEL's names).
_LATENT_TABLE, _VAE2LLM, _TIME_IN = "latent_pos_embed.pos_embed", "vae2llm.weight", "time_embedder.mlp.0.weight"

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



# ----------------------------------------------------------------------------- reading


def read_bagel_configs(bagel_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``llm_config.json`` and ``vit_config.json`` of a BAGEL directory, with BAGEL's defaults filled in."""
    bagel_dir = Path(bagel_dir)
    llm = {**_QWEN2_DEFAULTS, **read_json(bagel_dir / LLM_CONFIG_FILE, "BAGEL's Qwen2 config")}
    vit = {**_SIGLIP_DEFAULTS, **read_json(bagel_dir / VIT_CONFIG_FILE, "BAGEL's SigLIP config")}
    if llm["num_key_value_heads"] is None:  # Qwen2Config: None means one KV head per query head
        llm["num_key_value_heads"] = llm["num_attention_heads"]
    return llm, vit


def _json_fields(llm: dict[str, Any], vit: dict[str, Any], bagel_dir: Path) -> dict[str, tuple[Any, str]]:
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




def _tokenizer_special_tokens(bagel_dir: Path) -> dict[str, int] | None:
    """Special token text -> id from the release's tokenizer files; None when it has none of them."""
    found: dict[str, int] = {}
    seen = False
    tokenizer = bagel_dir / "tokenizer.json"
    if tokenizer.is_file():
        seen = True
        for token in read_json(tokenizer, "the tokenizer").get("added_tokens") or []:
            found[token["content"]] = int(token["id"])
    config = bagel_dir / "tokenizer_config.json"
    if config.is_file():
        seen = True
        for token_id, token in (read_json(config, "the tokenizer config").get("added_tokens_decoder") or {}).items():
            found.setdefault(token["content"], int(token_id))
    added = bagel_dir / "added_tokens.json"
    if added.is_file():
        seen = True
        for content, token_id in read_json(added, "the added tokens").items():
            found.setdefault(content, int(token_id))
    return found if seen else None


def _marker_fields(bagel_dir: Path) -> dict[str, tuple[Any, str]]:
    """The vision marker ids the tokenizer defines (None: it has none, MODUS appends its own)."""
    special = _tokenizer_special_tokens(bagel_dir)
    if special is None:
        return {}  # no tokenizer files: nothing to compare
    return {
        field: (special.get(text), f"{bagel_dir}: the tokenizer's {text} = "
                + (str(special[text]) if text in special else "absent (null: MODUS appends the marker)"))
        for field, text in VISION_MARKERS.items()
    }  # fmt: skip


def _vae_fields(bagel_dir: Path) -> dict[str, tuple[Any, str]]:
    """The autoencoder's settings: ``ae_config.json`` when the release has one, else FLUX's."""
    path = bagel_dir / AE_CONFIG_FILE
    if path.is_file():
        settings = read_json(path, "the autoencoder settings")
        unknown = sorted(set(settings) - set(FLUX_AE))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys are {sorted(FLUX_AE)}")
        return {f"vae.{k}": (settings.get(k, v), f"{path}: {k} = {settings.get(k, v)!r}") for k, v in FLUX_AE.items()}
    why = f"{bagel_dir} has no {AE_CONFIG_FILE}, so its {AE_FILE} is FLUX.1's autoencoder, whose"
    return {f"vae.{k}": (v, f"{why} {k} is {v!r}") for k, v in FLUX_AE.items()}


def _latent_fields(bagel_dir: Path, latent_channels: int) -> dict[str, tuple[Any, str]]:
    """Latent geometry from tensor shapes in ``ema.safetensors`` (its header only; none when it is absent)."""
    path = bagel_dir / EMA_FILE
    if not path.is_file():
        return {}
    with SafetensorsSource([path]) as ema:
        shapes = {name: ema.shape(name) for name in (_LATENT_TABLE, _VAE2LLM, _TIME_IN) if name in ema}
    fields: dict[str, tuple[Any, str]] = {}
    if _LATENT_TABLE in shapes:
        side = math.isqrt(shapes[_LATENT_TABLE][0])
        fields["max_latent_size"] = (side, f"{path}: {_LATENT_TABLE} has {shapes[_LATENT_TABLE][0]} = {side}^2 rows")
    if _VAE2LLM in shapes:
        patch = math.isqrt(shapes[_VAE2LLM][1] // latent_channels)
        origin = f"{path}: {_VAE2LLM} takes {shapes[_VAE2LLM][1]} = {patch}^2 x {latent_channels} latent values"
        fields["latent_patch_size"] = (patch, origin)
    if _TIME_IN in shapes:
        fields["timestep_frequency_dim"] = (shapes[_TIME_IN][1], f"{path}: {_TIME_IN} has {shapes[_TIME_IN][1]} inputs")
    return fields


def release_fields(bagel_dir: str | Path) -> dict[str, tuple[Any, str]]:
    """Every MODUS model field the release in ``bagel_dir`` determines -> (value, where it comes from).

    Field names are relative to ``model.`` (``llm.num_layers``); ``vit.num_layers_used`` stands
    for ``vit.num_layers`` with BAGEL's ``select_layer``.
    """
    bagel_dir = Path(bagel_dir)
    llm, vit = read_bagel_configs(bagel_dir)
    fields = _json_fields(llm, vit, bagel_dir)
    fields.update({field: (value, why) for field, (value, why) in _FIXED_BY_BAGEL.items()})
    fields.update(_marker_fields(bagel_dir))
    fields.update(_vae_fields(bagel_dir))
    fields.update(_latent_fields(bagel_dir, fields["vae.latent_channels"][0]))
    return fields


def _set_field(cfg: ModelConfig, field: str, value: Any) -> None:
    if field == "vit.num_layers_used":
        cfg.vit.num_layers, cfg.vit.select_layer = value + BAGEL_VIT_DROPPED_LAYERS, -1 - BAGEL_VIT_DROPPED_LAYERS
        return
    *sections, key = field.split(".")
    setattr(operator.attrgetter(".".join(sections))(cfg) if sections else cfg, key, value)


def _overrides(field: str, value: Any) -> list[str]:
    """The ``--set`` items that give ``field`` its release value."""
    if field == "vit.num_layers_used":
        layers, select = value + BAGEL_VIT_DROPPED_LAYERS, -1 - BAGEL_VIT_DROPPED_LAYERS
        return [f"model.vit.num_layers={layers}", f"model.vit.select_layer={select}"]
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value).replace(" ", "")
    return [f"model.{field}={text}"]


def release_model_config(bagel_dir: str | Path, base: ModelConfig | None = None) -> ModelConfig:
    """The model config of the BAGEL release in ``bagel_dir``: every field it determines, from it.

    The other (MODUS-only) fields, such as the new vocabulary tokens, come from ``base``
    (default: the ``ModelConfig`` defaults, i.e. configs/7b.json's). The release must hold
    its tokenizer files (they give the vision marker ids). The result is validated and
    passes ``check_bagel_config`` by construction.
    """
    fields = release_fields(bagel_dir)
    if not all(field in fields for field in VISION_MARKERS):
        raise ValueError(
            f"{bagel_dir} has no tokenizer files (tokenizer.json, tokenizer_config.json or added_tokens.json), so the "
            f"ids of {' and '.join(VISION_MARKERS.values())} are unknown; copy the release's tokenizer files into it, "
            "or give a config whose model.vocab says them"
        )
    cfg = copy.deepcopy(base) if base is not None else ModelConfig()
    for field, (value, _) in fields.items():
        _set_field(cfg, field, value)
    source = f"the model config derived from {bagel_dir}"
    return config_from_dict({"model": config_to_dict(cfg)}, source=source).model


def check_bagel_config(cfg: ModelConfig, bagel_dir: str | Path) -> None:
    """Refuse ``cfg`` unless it describes the model of the BAGEL release in ``bagel_dir``.

    One ``ValueError`` lists every differing field (the release's file, key and value, and
    the config's field and value) and ends with the ``--set`` overrides that fix them all.
    """
    problems, fixes = [], []
    for field, (value, origin) in release_fields(bagel_dir).items():
        ours = operator.attrgetter(field)(cfg)
        if ours != value:
            problems.append(f"{origin}, but the model config has model.{field} = {ours!r}")
            fixes += _overrides(field, value)
    if problems:
        raise ValueError(
            f"the model config does not match the BAGEL release {bagel_dir} in {len(problems)} field(s): "
            + "; ".join(problems)
            + ". Use the config that matches the release (configs/7b.json for BAGEL-7B-MoT), or fix those fields: "
            + " ".join(f"--set {item}" for item in fixes)
        )


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


def ae_json_config(cfg: ModelConfig) -> dict[str, Any]:
    """``ae_config.json`` for an export of ``cfg``: the autoencoder settings a reader cannot see in the tensors."""
    return {key: operator.attrgetter(f"vae.{key}")(cfg) for key in FLUX_AE}
