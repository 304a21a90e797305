"""BAGEL-7B-MoT's release layout in and out.

A BAGEL directory holds ``ema.safetensors`` (the model, BAGEL's key names, bf16),
``llm_config.json`` (a Qwen2 config), ``vit_config.json`` (a SigLIP vision config),
``ae.safetensors`` (the FLUX autoencoder, FLUX's names) and the Qwen2 tokenizer files.
The MODUS config is checked against every setting the release determines before a tensor
is read (``release.check_bagel_config``: its JSON files, tokenizer markers, autoencoder
settings and latent geometry, every mismatch in one message); tensors must then have the
shapes of that config, and the stored 2D sin-cos tables must equal the ones MODUS computes.
Exports also write ``ae_config.json`` (``release.ae_json_config``), so a release with an
autoencoder other than FLUX's says which.

The vocabulary: BAGEL's embedding and LM head have ``vocab_size`` rows, MODUS's text
range; loading appends MODUS's new rows (``source.extend_vocab_rows``) and keeps BAGEL's
bit for bit. Exporting writes every row by default (``llm_config.json`` then says
``vocab_size`` = all rows and ``modus_text_vocab_size`` = the text rows; BAGEL's code
builds its tables from ``vocab_size``, so it loads the result), or only the text rows.
"""

from __future__ import annotations

import math
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
    write_json,
    write_safetensors,
)
from modus_mega.convert.hf import DEFAULT_MAX_SHARD_BYTES, expected_shapes, write_hf
from modus_mega.convert.keymap import VAE_PREFIX, bagel_to_ours, is_vae_name, ours_to_bagel
from modus_mega.convert.release import (
    AE_CONFIG_FILE,
    AE_FILE,
    EMA_FILE,
    LLM_CONFIG_FILE,
    VIT_CONFIG_FILE,
    ae_json_config,
    bagel_json_configs,
    check_bagel_config,
)
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

SINCOS_TABLES = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")  # fixed 2D sin-cos tables


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
        rounding = torch.finfo(stored.dtype).eps if stored.is_floating_point() else 0.0  # an integer table: cast
        if error > max(rounding, torch.finfo(torch.bfloat16).eps):
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
        check_floating(source, source.names(), cast_to=None)
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
        check_floating(source, source.names(), dtype)
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
        if fix is not None:
            check_finite(tensor, resized.describe(item.source_name), fix)
        return cast(tensor, item.dtype)

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
        write_json(tmp / AE_CONFIG_FILE, ae_json_config(cfg))
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
