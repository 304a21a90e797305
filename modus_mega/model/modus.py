"""The MODUS model: input embeddings of the three token types, the MoT decoder, the heads.

Shape legend: T packed tokens, D LLM width, V padded vocabulary, N_ce positions that
predict a 1D token, N_mse noisy 2D tokens, P = latent_patch_size^2 * latent_channels.

The forward is split into ``embed`` -> ``layers`` -> ``heads`` so a pipeline can cut it
between stages; ``build_context`` computes the per-micro-batch routing, RoPE tables and
attention metadata once from integer metadata that travels with the hidden states.
Between ``embed`` and ``heads`` each rank holds its rows of the residual stream
(``Collectives.scatter`` / ``gather``: all of them, or its share under sequence parallelism).
Parameter names follow BAGEL's (``modus_mega/convert`` holds the key map).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from modus_mega.config import ModelConfig
from modus_mega.encoders.vit import SiglipNaViT
from modus_mega.model.embeddings import MLPConnector, SinCos2DPositionEmbedding, TimestepEmbedder
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT, ModelInputs
from modus_mega.model.layers import SERIAL_LINEARS, Collectives, LinearFactory, RMSNorm
from modus_mega.model.mot import EXPERT_1D, EXPERT_2D, NUM_EXPERTS, LayerContext, MoTLayer
from modus_mega.ops.attention import AttentionBackend, get_attention_backend
from modus_mega.vocab import build_vocabulary


class ModusModel(nn.Module):
    """Decoder-only any-to-any MoT over text, ViT and VAE tokens."""

    def __init__(
        self, cfg: ModelConfig, linears: LinearFactory = SERIAL_LINEARS, attention: AttentionBackend | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # The attention every forward uses, chosen once per run: ``parallel/build.py`` passes the one
        # for the run's device; without it, ``cfg.attention_backend`` is resolved at the first forward
        # for the inputs' device, then kept.
        self.attention = attention
        llm = cfg.llm
        d = llm.hidden_size
        self.vocab = build_vocabulary(cfg.vocab)
        self.collectives = linears.collectives

        self.embed_tokens = linears.embedding(self.vocab.padded_size, d)
        self.layers = nn.ModuleList(MoTLayer(llm, linears) for _ in range(llm.num_layers))
        self.final_norms = nn.ModuleList(RMSNorm(d, llm.rms_norm_eps) for _ in range(NUM_EXPERTS))
        self.lm_head = linears.column(d, self.vocab.padded_size, False)
        if llm.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

        self.time_embedder = TimestepEmbedder(d, cfg.timestep_frequency_dim)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, d)
        self.llm2vae = nn.Linear(d, cfg.patch_latent_dim)
        self.latent_pos_embed = SinCos2DPositionEmbedding(cfg.max_latent_size, d)

        self.vit = SiglipNaViT(cfg.vit)
        self.connector = MLPConnector(cfg.vit.hidden_size, d)
        self.vit_pos_embed = SinCos2DPositionEmbedding(cfg.vit.max_patches_per_side, d)

    # ------------------------------------------------------------------ per micro-batch

    def build_context(self, inputs: ModelInputs, attention: AttentionBackend | None = None) -> LayerContext:
        """Routing, RoPE tables and attention metadata, computed once for all layers.

        ``attention`` overrides the model's backend for this call (tests compare backends).
        """
        if attention is None:
            if self.attention is None:
                self.attention = get_attention_backend(self.cfg.attention_backend, inputs.attn_lo.device)
            attention = self.attention
        return LayerContext.build(
            self.cfg.llm, inputs.token_type, inputs.position_ids, inputs.attn_lo, inputs.attn_hi,
            self.embed_tokens.weight.dtype, attention, self.collectives,
        )  # fmt: skip

    # ------------------------------------------------------------------ stages

    def embed(self, inputs: ModelInputs) -> Tensor:
        """Input embeddings [T, D] (``embed_inputs``)."""
        return embed_inputs(self, inputs)

    def decode(self, hidden: Tensor, ctx: LayerContext) -> Tensor:
        """Run every decoder layer: [T, D] -> [T, D], on this rank's rows [R, D] in between."""
        rows = self.collectives.scatter(hidden)
        for layer in self.layers:
            rows = layer(rows, ctx)
        return self.collectives.gather(rows, hidden.shape[0])

    def heads(self, hidden: Tensor, ce_index: Tensor, mse_index: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [N_ce, V] and velocities [N_mse, P] (``output_heads``)."""
        return output_heads(self, hidden, ce_index, mse_index)

    def forward(
        self, inputs: ModelInputs, ce_index: Tensor, mse_index: Tensor, attention: AttentionBackend | None = None
    ) -> tuple[Tensor, Tensor]:
        """The whole model on one micro-batch; see ``heads`` for the outputs."""
        ctx = self.build_context(inputs, attention)
        hidden = self.decode(self.embed(inputs), ctx)
        return self.heads(hidden, ce_index, mse_index)


def decoder_layers(m: nn.Module) -> dict[int, MoTLayer]:
    """The decoder layers ``m`` holds by global index: all of a ``ModusModel``'s, or a pipeline stage's own.

    A model keeps them in a ``ModuleList``; a stage in a ``ModuleDict`` keyed by global index.
    """
    layers = m.layers
    items = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
    return {int(index): layer for index, layer in items}


# ----------------------------------------------------------------------------- the ends of the model
# Free functions over the modules they read, so a pipeline stage holding those modules under
# the same names (``parallel/pipeline.py``) runs the model's own code.


class EmbeddingModules(Protocol):
    """What ``embed_inputs`` reads: a ``ModusModel``, or the first pipeline stage."""

    embed_tokens: nn.Module
    vit: SiglipNaViT
    connector: MLPConnector
    vit_pos_embed: SinCos2DPositionEmbedding
    vae2llm: nn.Linear
    time_embedder: TimestepEmbedder
    latent_pos_embed: SinCos2DPositionEmbedding


class HeadModules(Protocol):
    """What ``output_heads`` reads: a ``ModusModel``, or the last pipeline stage."""

    final_norms: nn.ModuleList
    lm_head: nn.Module
    llm2vae: nn.Linear
    collectives: Collectives


def embed_inputs(m: EmbeddingModules, inputs: ModelInputs) -> Tensor:
    """Input embeddings [T, D]: text ids, ViT patches and noised VAE latents, in sequence order.

    The ViT and the 2D input modules run on every call, even with zero tokens, so
    every rank takes part in the same collectives (DESIGN §6).
    """
    token_type = inputs.token_type
    text_index = torch.nonzero(token_type == TOKEN_TEXT, as_tuple=True)[0]
    vit_index = torch.nonzero(token_type == TOKEN_VIT, as_tuple=True)[0]
    vae_index = torch.nonzero(token_type == TOKEN_VAE, as_tuple=True)[0]

    text = m.embed_tokens(inputs.input_ids.index_select(0, text_index))  # [N_text, D]
    vit = m.vit(inputs.vit_patches, inputs.vit_position_ids, inputs.vit_cu_seqlens)
    vit = m.connector(vit) + m.vit_pos_embed(inputs.vit_position_ids)  # [N_vit, D]
    vae = (
        m.vae2llm(inputs.vae_tokens)
        + m.time_embedder(inputs.vae_timesteps)
        + m.latent_pos_embed(inputs.vae_position_ids)
    )  # [N_vae, D]

    rows = torch.cat([text, vit.to(text.dtype), vae.to(text.dtype)])
    order = torch.argsort(torch.cat([text_index, vit_index, vae_index]))
    return rows[order]


def output_heads(m: HeadModules, hidden: Tensor, ce_index: Tensor, mse_index: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [N_ce, V] at positions that predict a 1D token, velocities [N_mse, P] at noisy 2D tokens.

    ``ce_index`` positions are 1D-expert tokens and ``mse_index`` positions 2D-expert
    tokens (the document builder guarantees it), so each gets its own expert's final norm.
    """
    logits = m.lm_head(m.collectives.copy(m.final_norms[EXPERT_1D](hidden.index_select(0, ce_index))))
    velocity = m.llm2vae(m.final_norms[EXPERT_2D](hidden.index_select(0, mse_index)))
    return logits, velocity
