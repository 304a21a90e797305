"""Documents are packed into micro-batches of a fixed token budget (DESIGN §5).

Static shapes keep compilation and the pipeline engine happy: every micro-batch has
exactly ``token_budget`` tokens; the rest is padding whose tokens each see only
themselves, so no real token sees them. A document that does not fit the current
micro-batch waits in an overflow buffer and is tried first next time; one longer than
the budget can never fit and is dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch
from torch import Tensor

from modus_mega.data.documents import IGNORE_LABEL, Document
from modus_mega.encoders.vae import latent_position_ids
from modus_mega.encoders.vit import patchify_image, vit_position_ids
from modus_mega.model.inputs import TOKEN_TEXT, ModelInputs, map_tensors
from modus_mega.ops.mask import lo_hi_for_layout, padding_lo_hi

TOO_LONG = "longer_than_token_budget"  # the packer's one reason to drop a document (a log field name)


@dataclass
class PackedBatch:
    """One packed micro-batch as the loader yields it: the model's inputs, the per-token targets,
    and the 2D images still as pixels (the VAE encodes them on the device: ``training/prepare.py``).

    T = token budget; I_vae image splits.
    """

    model: ModelInputs  # every model input but the 2D tokens: ``vae_tokens`` is [0, 0] until encoded
    ce_labels: Tensor  # [T] long: next 1D target token or IGNORE_LABEL
    modality_ids: Tensor  # [T] long: modality of each token's segment (padding: 0)
    vae_images: Tensor  # [I_vae, 3, H_max, W_max] float, zero-padded bottom/right
    vae_grid: Tensor  # [I_vae, 2] long: (rows, cols) of 2D tokens of each image
    num_real_tokens: int  # tokens that belong to documents (the rest is padding)
    num_documents: int

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor on ``device``."""
        return map_tensors(replace(self, model=self.model.to(device)), lambda t: t.to(device, non_blocking=True))


class Packer:
    """First-fit-decreasing packer over a look-ahead buffer of pending documents.

    A micro-batch is cut once the buffer holds ``lookahead`` budgets' worth of tokens, so
    the packer has choices; the oldest pending document always goes in first, so none
    waits forever, and the rest of the budget is filled largest-first.
    """

    def __init__(
        self,
        token_budget: int,
        vit_patch: int,
        vit_max_side: int,
        vae_cell: int,
        max_latent_size: int,
        lookahead: float = 2.0,
    ) -> None:
        self.token_budget = token_budget
        self.vit_patch = vit_patch
        self.vit_max_side = vit_max_side
        self.vae_cell = vae_cell
        self.max_latent_size = max_latent_size
        self.lookahead = lookahead
        self.pending: list[Document] = []
        self.dropped: Counter[str] = Counter()  # reason -> documents dropped

    def push(self, doc: Document) -> Iterator[PackedBatch]:
        """Add one document; yield the micro-batches that are now complete (zero or more)."""
        if len(doc) > self.token_budget:
            self.dropped[TOO_LONG] += 1
            return
        self.pending.append(doc)
        while sum(len(d) for d in self.pending) >= self.lookahead * self.token_budget:
            yield self.collate(self._take())

    def flush(self) -> Iterator[PackedBatch]:
        """Pack everything still pending."""
        while self.pending:
            yield self.collate(self._take())

    def pack(self, documents: Iterable[Document]) -> Iterator[PackedBatch]:
        """Pack a finite stream of documents, then flush."""
        for doc in documents:
            yield from self.push(doc)
        yield from self.flush()

    def _take(self) -> list[Document]:
        """The oldest pending document, then the largest others that still fit (first-fit decreasing)."""
        oldest, *others = self.pending
        chosen, used = [oldest], len(oldest)
        for doc in sorted(others, key=len, reverse=True):
            if used + len(doc) <= self.token_budget:
                chosen.append(doc)
                used += len(doc)
        taken = {id(d) for d in chosen}
        self.pending = [d for d in self.pending if id(d) not in taken]
        return chosen

    def collate(self, docs: list[Document]) -> PackedBatch:
        """Lay ``docs`` out back to back and pad to the token budget."""
        budget = self.token_budget
        num_real = sum(len(d) for d in docs)
        num_pad = budget - num_real
        assert num_pad >= 0, "collate got more tokens than the budget"

        def cat_lists(attr: str, pad_value: int) -> Tensor:
            values = [v for d in docs for v in getattr(d, attr)] + [pad_value] * num_pad
            return torch.tensor(values, dtype=torch.long)

        lo, hi = lo_hi_for_layout([d.layout for d in docs]) if docs else (torch.zeros(0, dtype=torch.int32),) * 2
        pad_lo, pad_hi = padding_lo_hi(num_real, num_pad)

        vit_images = [img for d in docs for img in d.vit_images]
        vit_patches = [patchify_image(img, self.vit_patch) for img in vit_images]
        vit_pos = [
            vit_position_ids(img.shape[1] // self.vit_patch, img.shape[2] // self.vit_patch, self.vit_max_side)
            for img in vit_images
        ]
        vit_lengths = torch.tensor([p.shape[0] for p in vit_patches], dtype=torch.int32)
        patch_dim = 3 * self.vit_patch**2

        vae_images = [img for d in docs for img in d.vae_images]
        vae_times = [t for d in docs for t in d.vae_timesteps]
        grids = [(img.shape[1] // self.vae_cell, img.shape[2] // self.vae_cell) for img in vae_images]
        h_max = max((img.shape[1] for img in vae_images), default=self.vae_cell)
        w_max = max((img.shape[2] for img in vae_images), default=self.vae_cell)
        padded = torch.zeros(len(vae_images), 3, h_max, w_max)
        for i, img in enumerate(vae_images):
            padded[i, :, : img.shape[1], : img.shape[2]] = img
        vae_pos = [latent_position_ids(h, w, self.max_latent_size) for h, w in grids]
        vae_t = [torch.full((h * w,), t) for (h, w), t in zip(grids, vae_times)]

        model = ModelInputs(
            input_ids=cat_lists("input_ids", 0),
            token_type=cat_lists("token_type", TOKEN_TEXT),
            position_ids=cat_lists("position_ids", 0),
            attn_lo=torch.cat([lo, pad_lo]),
            attn_hi=torch.cat([hi, pad_hi]),
            vit_patches=torch.cat(vit_patches) if vit_patches else torch.zeros(0, patch_dim),
            vit_position_ids=torch.cat(vit_pos) if vit_pos else torch.zeros(0, dtype=torch.long),
            vit_cu_seqlens=torch.nn.functional.pad(torch.cumsum(vit_lengths, 0, dtype=torch.int32), (1, 0)),
            vae_tokens=torch.zeros(0, 0),  # made from vae_images on the device
            vae_timesteps=torch.cat(vae_t) if vae_t else torch.zeros(0),
            vae_position_ids=torch.cat(vae_pos) if vae_pos else torch.zeros(0, dtype=torch.long),
        )
        return PackedBatch(
            model=model,
            ce_labels=cat_lists("ce_labels", IGNORE_LABEL),
            modality_ids=cat_lists("modality_ids", 0),
            vae_images=padded,
            vae_grid=torch.tensor(grids, dtype=torch.long).reshape(-1, 2),
            num_real_tokens=num_real,
            num_documents=len(docs),
        )
