"""The 1D expert as a stock ``transformers`` language model (``Qwen3ForCausalLM``).

BAGEL's decoder, and so MODUS's 1D expert, is Qwen2 with RMSNorm over head_dim on q and k:
``Qwen3ForCausalLM`` with ``attention_bias=True`` expresses it exactly once its o_proj bias
is zero (Qwen2 has biases on q, k, v only; ``tests/model/test_hf_parity.py``). The
directory written here loads with ``AutoModelForCausalLM.from_pretrained`` and no code of
ours; on text it computes what MODUS computes for 1D tokens, whose every layer runs the 1D
expert (the 2D expert, the ViT, the VAE and the 2D in/out modules are left out).

Layout: ``config.json`` (a ``Qwen3Config``), ``model.safetensors.index.json`` and shards
under Qwen3's names, and the tokenizer files of the source when it has them::

    model.embed_tokens.weight, lm_head.weight   embed_tokens.weight, lm_head.weight (rows: see below)
    model.norm.weight                           final_norms.0.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}, .{q,k}_norm.weight,
    model.layers.{i}.{input,post_attention}_layernorm.weight, .mlp.{gate,up,down}_proj.weight
                                                layers.{i}.experts.0.<same> (absent biases: zeros)

Vocabulary: the whole extended vocabulary (``padded_size`` rows: MODUS's new tokens keep
their ids) or, with ``text_vocab_only``, the pretrained text rows only
(``text_vocab_size``), a drop-in replacement of the original language model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen3Config

from modus_mega.config import ModelConfig
from modus_mega.convert.files import PlannedTensor, atomic_directory, cast, copy_tokenizer_files, output_dtype
from modus_mega.convert.hf import CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, DTYPE_TENSOR, expected_shapes, write_shards
from modus_mega.convert.keymap import VOCAB_TENSORS, is_vae_name
from modus_mega.convert.source import TensorSource, check_tensors
from modus_mega.model.mot import EXPERT_1D
from modus_mega.vocab import build_vocabulary

ARCHITECTURE = "Qwen3ForCausalLM"
ZERO_BIAS = "<zeros>"  # source name of a bias our expert does not have (a zero tensor is written)


def text_model_config(cfg: ModelConfig, vocab_rows: int, dtype: torch.dtype) -> Qwen3Config:
    """The ``Qwen3Config`` of the 1D expert of ``cfg`` with ``vocab_rows`` vocabulary rows."""
    llm = cfg.llm
    if not llm.qk_norm:
        raise ValueError(
            "model.llm.qk_norm is false: Qwen3 always normalises q and k, so this decoder has no exact Qwen3 form "
            "(it is a plain Qwen2); export the text model only from a checkpoint with qk_norm true"
        )
    return Qwen3Config(
        vocab_size=vocab_rows,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim,
        hidden_act="silu",
        rms_norm_eps=llm.rms_norm_eps,
        rope_theta=llm.rope_theta,
        attention_bias=True,
        tie_word_embeddings=llm.tie_word_embeddings,
        architectures=[ARCHITECTURE],
        dtype=str(dtype).removeprefix("torch."),
    )


def text_model_names(cfg: ModelConfig) -> dict[str, str]:
    """Qwen3 tensor name -> the MODUS tensor it holds (``ZERO_BIAS`` for a bias our expert lacks)."""
    llm = cfg.llm
    names = {"model.embed_tokens.weight": "embed_tokens.weight"}
    for i in range(llm.num_layers):
        ours, theirs = f"layers.{i}.experts.{EXPERT_1D}.", f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            has_bias = llm.o_bias if proj == "o_proj" else llm.qkv_bias
            names[f"{theirs}self_attn.{proj}.weight"] = f"{ours}{proj}.weight"
            names[f"{theirs}self_attn.{proj}.bias"] = f"{ours}{proj}.bias" if has_bias else ZERO_BIAS
        for norm in ("q_norm", "k_norm"):
            names[f"{theirs}self_attn.{norm}.weight"] = f"{ours}{norm}.weight"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{theirs}{norm}.weight"] = f"{ours}{norm}.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{theirs}mlp.{proj}.weight"] = f"{ours}mlp.{proj}.weight"
    names["model.norm.weight"] = f"final_norms.{EXPERT_1D}.weight"
    if not llm.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def write_text_model(
    source: TensorSource,
    cfg: ModelConfig,
    out: str | Path,
    text_vocab_only: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the 1D expert of ``source`` (MODUS names, full shapes) as a ``Qwen3ForCausalLM`` in ``out``.

    The source is checked as ``write_hf`` checks it, then streamed one tensor at a time
    (a zero bias is made where our expert has none), cast to ``dtype`` if given, into a
    temporary directory renamed to ``out`` at the end. Returns ``out``.
    """
    has_vae = any(is_vae_name(name) for name in source.names())
    check_tensors(expected_shapes(cfg, has_vae), source)
    rows = cfg.vocab.text_vocab_size if text_vocab_only else build_vocabulary(cfg.vocab).padded_size
    decoder_dtype = output_dtype(source.dtype(DTYPE_TENSOR), dtype)
    names = text_model_names(cfg)

    def planned(name: str, ours: str) -> PlannedTensor:
        if ours == ZERO_BIAS:  # as wide as its projection's output
            width = source.shape(names[name.removesuffix("bias") + "weight"])[0]
            return PlannedTensor(name, ours, torch.Size([width]), decoder_dtype)
        shape = source.shape(ours)
        if ours in VOCAB_TENSORS:
            shape = torch.Size([rows, *shape[1:]])
        return PlannedTensor(name, ours, shape, output_dtype(source.dtype(ours), dtype))

    def produce(item: PlannedTensor) -> torch.Tensor:
        if item.source_name == ZERO_BIAS:
            return torch.zeros(item.shape, dtype=item.dtype)
        if item.source_name in VOCAB_TENSORS:
            return cast(source.lazy(item.source_name)[:rows], dtype)
        return cast(source.read(item.source_name), dtype)

    plan = [planned(name, ours) for name, ours in names.items()]
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        write_shards(tmp, plan, produce, max_shard_bytes, f"write {out.name}", progress)
        text_model_config(cfg, rows, decoder_dtype).to_json_file(tmp / CONFIG_FILE)
        copy_tokenizer_files(Path(tokenizer_dir) if tokenizer_dir is not None else None, tmp)
    return out
