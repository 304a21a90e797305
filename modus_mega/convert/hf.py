"""The Hugging Face layout of a MODUS checkpoint: write it, read it, load a model from it.

Layout of a directory::

    config.json                      model_type "modus": the model config, the vocabulary and modality tables
    model.safetensors.index.json     {"metadata": {"total_size": ...}, "weight_map": {name: shard file}}
    model-0000i-of-0000N.safetensors shards of at most max_shard_bytes (default 5 GB) each
    tokenizer files                  copied from the source checkpoint when it has them

Tensor names are MODUS names (``keymap.py``): the model's own state-dict names, and the
frozen VAE's under ``vae.`` (optional). A single ``model.safetensors`` without an index
is read too. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from modus_mega.config import ModelConfig, config_from_dict, config_to_dict
from modus_mega.convert.files import (
    PlannedTensor,
    atomic_directory,
    cast,
    copy_tokenizer_files,
    nonfinite_fix,
    output_dtype,
    plan_shards,
    progress_bar,
    read_json,
    write_json,
    write_safetensors,
)
from modus_mega.convert.keymap import VAE_PREFIX, is_vae_name
from modus_mega.convert.source import (
    FilteredSource,
    ModuleSource,
    SafetensorsSource,
    TensorSource,
    check_finite,
    check_floating,
    check_tensors,
    load_into,
)
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.modalities import MODALITIES
from modus_mega.model.modus import ModusModel
from modus_mega.vocab import Vocabulary, build_vocabulary

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODEL_TYPE = "modus"
FORMAT_VERSION = 1  # bump when the layout or the naming changes incompatibly
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"


def vocabulary_table(vocab: Vocabulary) -> dict:
    """The extended vocabulary as plain JSON: every id range, by name."""
    return {
        "text": [vocab.text.start, vocab.text.stop],
        "vision_start_id": vocab.vision_start_id,
        "vision_end_id": vocab.vision_end_id,
        "end_of_segment_id": vocab.end_of_segment_id,
        "start_markers": {m.name: vocab.start_marker(m.name) for m in MODALITIES},
        "coordinates": [vocab.coordinates.start, vocab.coordinates.stop],
        "codebooks": {name: [ids.start, ids.stop] for name, ids in vocab.codebooks.items()},
        "num_tokens": vocab.num_tokens,
        "padded_size": vocab.padded_size,
    }


def hf_config(cfg: ModelConfig, has_vae: bool, dtype: torch.dtype | None) -> dict:
    """The ``config.json`` of a MODUS checkpoint of ``cfg``."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["ModusModel"],
        "format_version": FORMAT_VERSION,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "has_vae": has_vae,
        "model": config_to_dict(cfg),
        "vocabulary": vocabulary_table(build_vocabulary(cfg.vocab)),
        "modalities": [{"id": i, **dataclasses.asdict(m)} for i, m in enumerate(MODALITIES)],
    }


def read_hf_config(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    """The model config of the checkpoint in ``hf_dir`` and its raw ``config.json``.

    Refuses a config of another model type or format version, and one whose stored
    vocabulary table differs from what ``modus_mega/vocab.py`` lays out for its config
    (token ids would silently move).
    """
    path = Path(hf_dir) / CONFIG_FILE
    raw = read_json(path, "the MODUS model config")
    if raw.get("model_type") != MODEL_TYPE or raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has model_type={raw.get('model_type')!r} format_version={raw.get('format_version')!r}; "
            f"expected {MODEL_TYPE!r} version {FORMAT_VERSION}: this is not a MODUS checkpoint of this code's format "
            "(for a BAGEL release use `python -m modus_mega.convert from-bagel`)"
        )
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"{path} lacks the 'model' section (the MODUS model config); export the checkpoint again")
    cfg = config_from_dict({"model": raw["model"]}, source=str(path)).model
    table = vocabulary_table(build_vocabulary(cfg.vocab))
    stored = raw.get("vocabulary")
    if stored != table:
        differing = sorted(k for k in table if not isinstance(stored, dict) or stored.get(k) != table[k])
        raise ValueError(
            f"{path}: the stored vocabulary table differs from modus_mega/vocab.py's layout for this config in "
            f"{differing}; the checkpoint was written by a version that placed tokens differently: convert it "
            "with that version"
        )
    return cfg, raw


def open_hf(hf_dir: str | Path) -> SafetensorsSource:
    """The tensors of the Hugging Face layout in ``hf_dir`` (sharded with an index, or one file)."""
    hf_dir = Path(hf_dir)
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path, "the shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map'; export the checkpoint again")
        files = sorted({hf_dir / f for f in weight_map.values()})
        return SafetensorsSource(files, label=str(index_path), expected={n: hf_dir / f for n, f in weight_map.items()})
    if (hf_dir / SINGLE_FILE).is_file():
        return SafetensorsSource([hf_dir / SINGLE_FILE])
    raise ValueError(f"{hf_dir} holds neither {INDEX_FILE} nor {SINGLE_FILE}; it is not a Hugging Face checkpoint")


def expected_shapes(cfg: ModelConfig, with_vae: bool) -> dict[str, torch.Size]:
    """Every tensor name of a MODUS checkpoint of ``cfg`` and its full shape (built on the meta device)."""
    with torch.device("meta"):
        modules: dict[str, nn.Module] = {"": ModusModel(cfg)}
        if with_vae:
            modules[VAE_PREFIX] = FluxAutoEncoder(cfg.vae)
    shapes = ModuleSource(modules)
    return {name: shapes.shape(name) for name in shapes.names()}


def write_hf(
    source: TensorSource,
    cfg: ModelConfig,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``source`` (MODUS names, full shapes) as the Hugging Face layout in ``out``, atomically.

    The source must hold exactly the tensors of ``cfg``'s model (the VAE's too, or none of
    them), with their shapes, all floating point unless ``dtype`` is given; anything else is
    refused before a byte is written. Tensors are cast to ``dtype`` if given. A tensor holding
    NaN or Inf is refused as it is reached (nothing is left behind) unless ``allow_nonfinite``.
    Returns ``out``.
    """
    has_vae = any(is_vae_name(name) for name in source.names())
    check_tensors(expected_shapes(cfg, has_vae), source)
    check_floating(source, source.names(), dtype)
    fix = nonfinite_fix(allow_nonfinite)
    plan = [PlannedTensor(n, n, source.shape(n), output_dtype(source.dtype(n), dtype)) for n in source.names()]
    shards = plan_shards(plan, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(item.nbytes for item in plan)
    out = Path(out)

    def produce(item: PlannedTensor) -> torch.Tensor:
        tensor = source.read(item.source_name)
        return cast(tensor if fix is None else check_finite(tensor, source.describe(item.source_name), fix), dtype)

    with atomic_directory(out, overwrite) as tmp, progress_bar(total, f"write {out.name}", progress) as bar:
        for file, shard in zip(files, shards):
            write_safetensors(tmp / file, shard, produce, on_bytes=bar.update)
        weight_map = {item.name: file for file, shard in zip(files, shards) for item in shard}
        write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        stored = {item.dtype for item in plan if item.dtype.is_floating_point}
        write_json(tmp / CONFIG_FILE, hf_config(cfg, has_vae, stored.pop() if len(stored) == 1 else None))
        copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir is not None else None, tmp)
    return out


def save_pretrained(
    model: ModusModel,
    vae: FluxAutoEncoder | None,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write an in-memory model (and VAE) as the Hugging Face layout; see ``write_hf``."""
    modules: dict[str, nn.Module] = {"": model}
    if vae is not None:
        modules[VAE_PREFIX] = vae
    return write_hf(ModuleSource(modules), model.cfg, out, dtype, max_shard_bytes, tokenizer_dir, overwrite, progress)


def load_pretrained(
    hf_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    with_vae: bool = True,
    progress: bool = False,
) -> tuple[ModusModel, FluxAutoEncoder | None]:
    """Build the model (and VAE) of the checkpoint in ``hf_dir`` and load its weights.

    The modules are built on the meta device, moved to ``device`` (in ``dtype`` if
    given) without initialisation, and then every tensor is loaded (a strict load: every
    tensor present, nothing extra, every shape right). Both are returned in eval mode,
    the VAE frozen; the VAE is None when the checkpoint has none or ``with_vae`` is False.
    """
    cfg, raw = read_hf_config(hf_dir)
    with torch.device("meta"):
        model = ModusModel(cfg)
        vae = FluxAutoEncoder(cfg.vae) if with_vae and raw.get("has_vae") else None
    modules: dict[str, nn.Module] = {"": model}
    if vae is not None:
        modules[VAE_PREFIX] = vae
    for module in modules.values():
        if dtype is not None:
            module.to(dtype)
        module.to_empty(device=device)
    if cfg.llm.tie_word_embeddings:  # to_empty gives every parameter its own storage; restore the tie
        model.lm_head.weight = model.embed_tokens.weight
    with open_hf(hf_dir) as source:
        load_into(modules, FilteredSource(source, lambda n: vae is not None or not is_vae_name(n)), progress=progress)
    model.eval()
    if vae is not None:
        vae.eval().requires_grad_(False)
    return model, vae
