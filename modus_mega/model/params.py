"""Parameter counts of any config, built on the meta device (no memory, no init).

    python -m modus_mega.model.params --config configs/7b.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from modus_mega.config import ModelConfig, load_config
from modus_mega.model.modus import ModusModel


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of the MODUS model (the frozen VAE is counted apart)."""

    llm_total: int  # decoder: embedding, both experts of every layer, both final norms, LM head
    llm_active: int  # decoder weights one token uses: shared parts + one expert
    per_expert: int  # one expert across all layers, plus its final norm
    embedding: int  # input embedding (extended vocabulary, padded)
    lm_head: int  # LM head (0 extra when tied)
    vision: int  # ViT + connector + its position table
    generation_io: int  # vae2llm, llm2vae, time embedder, latent position table
    vae: int  # the frozen FLUX autoencoder
    new_vocab_rows: int  # embedding + LM head parameters of rows past the pretrained text vocabulary

    @property
    def total(self) -> int:
        """Everything the training run holds, the frozen VAE included."""
        return self.llm_total + self.vision + self.generation_io + self.vae


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Count parameters of ``cfg`` without allocating them."""
    from modus_mega.encoders.vae import FluxAutoEncoder

    with torch.device("meta"):
        model = ModusModel(cfg)
        vae = FluxAutoEncoder(cfg.vae)
    expert = sum(_numel(layer.experts[0]) for layer in model.layers) + _numel(model.final_norms[0])
    embedding = _numel(model.embed_tokens)
    lm_head = 0 if cfg.llm.tie_word_embeddings else _numel(model.lm_head)
    return ParameterCount(
        llm_total=embedding + lm_head + 2 * expert,
        llm_active=embedding + lm_head + expert,
        per_expert=expert,
        embedding=embedding,
        lm_head=lm_head,
        vision=_numel(model.vit) + _numel(model.connector) + _numel(model.vit_pos_embed),
        generation_io=_numel(model.vae2llm) + _numel(model.llm2vae) + _numel(model.time_embedder)
        + _numel(model.latent_pos_embed),
        vae=_numel(vae),
        new_vocab_rows=(model.vocab.padded_size - cfg.vocab.text_vocab_size)
        * cfg.llm.hidden_size
        * (1 if cfg.llm.tie_word_embeddings else 2),
    )


def main() -> None:
    """Print the parameter counts of a config."""
    parser = argparse.ArgumentParser(description="Count MODUS parameters for a config (meta device, instant).")
    parser.add_argument("--config", required=True, help="path to a config JSON, e.g. configs/7b.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C", help="config override")
    args = parser.parse_args()
    count = count_parameters(load_config(args.config, args.overrides).model)
    rows = [
        ("LLM total (both experts)", count.llm_total),
        ("LLM active per token", count.llm_active),
        ("LLM total, pretrained vocab only", count.llm_total - count.new_vocab_rows),
        ("LLM active, pretrained vocab only", count.llm_active - count.new_vocab_rows),
        ("  one expert (all layers)", count.per_expert),
        ("  embedding (extended vocab)", count.embedding),
        ("  LM head", count.lm_head),
        ("ViT + connector", count.vision),
        ("2D in/out modules", count.generation_io),
        ("VAE (frozen)", count.vae),
        ("everything", count.total),
    ]
    for label, n in rows:
        print(f"{label:<32} {n:>16,d}  ({n / 1e9:6.2f} B)")


if __name__ == "__main__":
    main()
