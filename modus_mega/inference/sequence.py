"""One generation branch's sequence: a growing training document, its KV cache, and the model inputs of its new tokens.

The sequence is a ``data.documents.Document`` built by the training ``DocumentBuilder``
(conditions with ``add_condition``, a target's ``<start:m>`` with ``add_marker``, a finished
target with ``add_condition_content``), so generation lays tokens out exactly as training
does: the same ids, expert routing, position ids and attention runs. ``flush`` runs the
tokens added since the last flush over the cache (``forward_over_cache`` with ``write=True``)
and returns their outputs; a noisy target split is never added to the document: it is run
read-only by ``noisy_split_velocity`` at every flow step. The ``*_all`` / ``*_velocities``
forms run several branches (guidance, best-of-N candidates) packed in one forward.

Clean VAE splits are encoded with the posterior MEAN (deterministic generation); training
samples the posterior when ``model.vae.sample_posterior`` is set.

Shapes: T new tokens, N 2D tokens of a split, P latent patch dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from modus_mega.config import ModelConfig
from modus_mega.data.documents import Document
from modus_mega.encoders.vae import FluxAutoEncoder, latent_position_ids, patchify_latents
from modus_mega.encoders.vit import patchify_image, vit_position_ids
from modus_mega.inference.kv_cache import CachedRequest, KVCache, Run, forward_over_caches
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE, ModelInputs
from modus_mega.model.modus import ModusModel
from modus_mega.ops.attention import AttentionBackend
from modus_mega.vocab import Vocabulary


@dataclass
class Sequence:
    """One branch: its document, the part of it already in the cache, and the cache."""

    doc: Document
    cache: KVCache = field(default_factory=KVCache)
    num_cached: int = 0  # tokens of ``doc`` already run into the cache
    vit_cached: int = 0  # of ``doc.vit_images``
    vae_cached: int = 0  # of ``doc.vae_images``


@dataclass
class SequenceRunner:
    """Runs sequences of one model: new tokens over the cache, noisy splits read-only."""

    model: ModusModel
    vae: FluxAutoEncoder
    attention: AttentionBackend
    cfg: ModelConfig
    vocab: Vocabulary

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def flush(self, seq: Sequence) -> Tensor:
        """Run the document's uncached tokens into the cache; logits [1, V] of the last one if it is text, else [0, V]."""
        return self.flush_all([seq])[0]

    @torch.no_grad()
    def flush_all(self, seqs: list[Sequence]) -> list[Tensor]:
        """``flush`` of several branches in one packed forward (``forward_over_caches``): per branch [1, V] or [0, V]."""
        return self._flush(seqs, every_text_row=False)

    @torch.no_grad()
    def flush_scoring(self, seq: Sequence) -> Tensor:
        """``flush`` returning the logits [T_text, V] of EVERY new text token (teacher forcing), in order."""
        return self._flush([seq], every_text_row=True)[0]

    def _flush(self, seqs: list[Sequence], every_text_row: bool) -> list[Tensor]:
        """Run the branches' uncached tokens in one packed forward; per branch its logits ([0, V] if nothing ran)."""
        empty = torch.zeros(0, self.vocab.padded_size, device=self.device)
        pending = [s for s in seqs if s.num_cached < len(s.doc)]
        requests = [self._flush_request(s, every_text_row) for s in pending]
        outputs = forward_over_caches(self.model, self.attention, requests) if pending else []
        by_branch = {id(s): logits for s, (logits, _) in zip(pending, outputs)}
        for s in pending:
            s.num_cached, s.vit_cached, s.vae_cached = len(s.doc), len(s.doc.vit_images), len(s.doc.vae_images)
        return [by_branch.get(id(s), empty) for s in seqs]

    def _flush_request(self, seq: Sequence, every_text_row: bool) -> CachedRequest:
        """The request that writes ``seq``'s uncached tokens into its cache, with logits at every text token
        (``every_text_row``) or at the last token if it is text."""
        doc, start = seq.doc, seq.num_cached
        inputs = self._inputs(seq, start)
        text_rows = torch.nonzero(inputs.token_type == TOKEN_TEXT, as_tuple=True)[0]
        if not every_text_row:
            text_rows = text_rows[text_rows == len(doc) - 1 - start]  # the last token, if it is text
        no_rows = torch.zeros(0, dtype=torch.long, device=self.device)
        return CachedRequest(seq.cache, inputs, _runs_after(doc.layout, start), text_rows, no_rows, write=True)

    @torch.no_grad()
    def noisy_split_velocity(self, seq: Sequence, x_t: Tensor, t: float, grid: tuple[int, int]) -> Tensor:
        """Velocity [N, P] of a noisy split of ``x_t`` [N, P] at flow time ``t``, run after the cached context."""
        return self.noisy_split_velocities([seq], x_t, t, grid)[0]

    @torch.no_grad()
    def noisy_split_velocities(self, seqs: list[Sequence], x_t: Tensor, t: float, grid: tuple[int, int]) -> list[Tensor]:
        """Velocity [N, P] per branch of the same noisy split ``x_t`` [N, P] at flow time ``t``, in one packed forward.

        The split (its two markers included) takes the position id each branch's document
        would give it (a noisy split does not advance the counter) and is never written to a cache.
        """
        assert all(s.num_cached == len(s.doc) for s in seqs), "flush the sequences before running a noisy split over them"
        n = x_t.shape[0]
        device = self.device
        rows = torch.arange(1, n + 1, device=device)
        requests = []
        for seq in seqs:
            inputs = ModelInputs(
                input_ids=torch.tensor([self.vocab.vision_start_id] + [0] * n + [self.vocab.vision_end_id], device=device),
                token_type=torch.tensor([TOKEN_TEXT] + [TOKEN_VAE] * n + [TOKEN_TEXT], device=device),
                position_ids=torch.full((n + 2,), seq.doc.next_position, device=device),
                attn_lo=torch.zeros(0, dtype=torch.int32), attn_hi=torch.zeros(0, dtype=torch.int32),  # from the runs
                vit_patches=torch.zeros(0, self.cfg.vit.patch_size**2 * self.cfg.vit.num_channels, device=device),
                vit_position_ids=torch.zeros(0, dtype=torch.long, device=device),
                vit_cu_seqlens=torch.zeros(1, dtype=torch.int32, device=device),
                vae_tokens=x_t,
                vae_timesteps=torch.full((n,), t, dtype=torch.float32, device=device),
                vae_position_ids=latent_position_ids(*grid, self.cfg.max_latent_size).to(device),
            )  # fmt: skip
            requests.append(CachedRequest(seq.cache, inputs, [("noise", n + 2)], rows[:0], rows, write=False))
        return [velocity for _, velocity in forward_over_caches(self.model, self.attention, requests)]

    def _inputs(self, seq: Sequence, start: int) -> ModelInputs:
        """Model inputs of the document's tokens [start:], with the images added since the last flush."""
        doc, cfg, device = seq.doc, self.cfg, self.device
        patch = cfg.vit.patch_size
        vit_images = doc.vit_images[seq.vit_cached :]
        vit_patches = [patchify_image(img, patch) for img in vit_images]
        vit_pos = [vit_position_ids(img.shape[1] // patch, img.shape[2] // patch, cfg.vit.max_patches_per_side) for img in vit_images]
        lengths = torch.tensor([p.shape[0] for p in vit_patches], dtype=torch.int32)
        vae_images = doc.vae_images[seq.vae_cached :]
        tokens, positions = [], []
        for image in vae_images:
            latent = self.vae.encode(image[None].to(device), sample=False)[0]  # [C, h, w]
            tokens.append(patchify_latents(latent, cfg.latent_patch_size))
            grid = (latent.shape[1] // cfg.latent_patch_size, latent.shape[2] // cfg.latent_patch_size)
            positions.append(latent_position_ids(*grid, cfg.max_latent_size))
        num_vae = sum(t.shape[0] for t in tokens)
        return ModelInputs(
            input_ids=torch.tensor(doc.input_ids[start:], device=device),
            token_type=torch.tensor(doc.token_type[start:], device=device),
            position_ids=torch.tensor(doc.position_ids[start:], device=device),
            attn_lo=torch.zeros(0, dtype=torch.int32), attn_hi=torch.zeros(0, dtype=torch.int32),  # from the runs
            vit_patches=(torch.cat(vit_patches) if vit_patches else torch.zeros(0, 3 * patch**2)).to(device),
            vit_position_ids=(torch.cat(vit_pos) if vit_pos else torch.zeros(0, dtype=torch.long)).to(device),
            vit_cu_seqlens=torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)).to(device),
            vae_tokens=torch.cat(tokens) if tokens else torch.zeros(0, cfg.patch_latent_dim, device=device),
            vae_timesteps=torch.zeros(num_vae, device=device),
            vae_position_ids=(torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)).to(device),
        )  # fmt: skip


def _runs_after(layout: list[Run], start: int) -> list[Run]:
    """The runs of a layout from token ``start`` on; ``start`` must be a run boundary or inside a causal run."""
    runs, position = [], 0
    for mode, length in layout:
        end = position + length
        if end > start:
            if position < start:
                assert mode == "causal", "a cache may only end inside a causal run (ops.mask.cache_boundaries)"
                runs.append((mode, end - start))
            else:
                runs.append((mode, length))
        position = end
    return runs
