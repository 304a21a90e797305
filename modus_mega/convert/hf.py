"""The Hugging Face layout of a MODUS checkpoint: write it, read it, load a model from it.

Layout of a directory::

    config.json                      ModusHFConfig (model_type "modus"): the model config, the vocabulary and
                                     modality tables, as save_pretrained writes it (modus_mega/hf)
    model.safetensors.index.json     {"metadata": {"total_parameters", "total_size"}, "weight_map": {name: shard}}
    model-0000i-of-0000N.safetensors shards of at most max_shard_bytes (default 5 GB) each
    tokenizer files                  copied from the source checkpoint when it has them

Tensor names are MODUS names (``keymap.py``): the model's own state-dict names, and the
frozen VAE's under ``vae.`` (optional). A single ``model.safetensors`` without an index
is read too. Nothing is ever unpickled. ``transformers`` loads the layout as
``modus_mega.hf.ModusHFModel`` (``AutoModel`` after ``import modus_mega.hf``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from modus_mega.config import ModelConfig
from modus_mega.convert.files import (
    PlannedTensor,
    atomic_directory,
    cast,
    copy_tokenizer_files,
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
    check_tensors,
    load_into,
)
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.hf.config import MODEL_TYPE, ModusHFConfig
from modus_mega.model.modus import ModusModel

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default "5GB"
# config.json's dtype is the decoder's stored dtype, as save_pretrained records the model's
# (its first floating parameter's); a VAE kept in fp32 next to a bf16 decoder does not change it.
DTYPE_TENSOR = "embed_tokens.weight"


def read_hf_config(hf_dir: str | Path) -> tuple[ModelConfig, ModusHFConfig]:
    """The model config of the checkpoint in ``hf_dir`` and its ``config.json`` as a ``ModusHFConfig``.

    Refuses a config of another model type or format version, and one whose stored
    vocabulary table differs from what ``modus_mega/vocab.py`` lays out for its config
    (token ids would silently move).
    """
    path = Path(hf_dir) / CONFIG_FILE
    raw = read_json(path, "the MODUS model config")
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(
            f"{path} has model_type={raw.get('model_type')!r}; expected {MODEL_TYPE!r}: this is not a MODUS "
            "checkpoint (for a BAGEL release use `python -m modus_mega.convert from-bagel`)"
        )
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"{path} lacks the 'model' section (the MODUS model config); export the checkpoint again")
    config = ModusHFConfig.from_dict(raw)
    return config.model_config(source=str(path)), config


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


def write_shards(
    out_dir: Path,
    plan: list[PlannedTensor],
    produce: Callable[[PlannedTensor], torch.Tensor],
    max_shard_bytes: int,
    desc: str,
    progress: bool,
) -> None:
    """Write ``plan`` into ``out_dir`` as Hugging Face's shards and index, one tensor at a time.

    Shards are ``model-0000i-of-0000N.safetensors`` of at most ``max_shard_bytes`` each
    (``plan_shards``); the index holds the metadata ``save_pretrained`` writes and the
    weight map. ``produce`` returns each planned tensor (``write_safetensors``); ``desc``
    labels the progress bar.
    """
    shards = plan_shards(plan, max_shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(item.nbytes for item in plan)
    with progress_bar(total, desc, progress) as bar:
        for file, shard in zip(files, shards):
            write_safetensors(out_dir / file, shard, produce, on_bytes=bar.update)
    weight_map = {item.name: file for file, shard in zip(files, shards) for item in shard}
    metadata = {"total_parameters": sum(item.shape.numel() for item in plan), "total_size": total}
    write_json(out_dir / INDEX_FILE, {"metadata": metadata, "weight_map": weight_map})


def write_hf(
    source: TensorSource,
    cfg: ModelConfig,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``source`` (MODUS names, full shapes) as the Hugging Face layout in ``out``, atomically.

    The source must hold exactly the tensors of ``cfg``'s model (the VAE's too, or none of
    them), with their shapes; anything else is refused before a byte is written. Floating
    tensors are cast to ``dtype`` if given. Returns ``out``.
    """
    has_vae = any(is_vae_name(name) for name in source.names())
    check_tensors(expected_shapes(cfg, has_vae), source)
    plan = [PlannedTensor(n, n, source.shape(n), output_dtype(source.dtype(n), dtype)) for n in source.names()]
    out = Path(out)

    def produce(item: PlannedTensor) -> torch.Tensor:
        return cast(source.read(item.source_name), dtype)

    with atomic_directory(out, overwrite) as tmp:
        write_shards(tmp, plan, produce, max_shard_bytes, f"write {out.name}", progress)
        decoder_dtype = output_dtype(source.dtype(DTYPE_TENSOR), dtype)
        ModusHFConfig.from_model_config(cfg, has_vae, decoder_dtype).to_json_file(tmp / CONFIG_FILE)
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
    cfg, config = read_hf_config(hf_dir)
    with torch.device("meta"):
        model = ModusModel(cfg)
        vae = FluxAutoEncoder(cfg.vae) if with_vae and config.has_vae else None
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
