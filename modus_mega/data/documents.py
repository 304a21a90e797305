"""One training sample becomes one document (DESIGN §3).

A sample names one target modality (drawn by ``data.target_weights``); a random subset of
the other available modalities, in random order, are conditions (none at all with
probability ``data.condition_dropout``); the target comes last. Every modality becomes one
segment that opens with its ``<start:{modality}>`` marker (1D expert, causal):

- 1D condition: its tokens, causal.
- 1D target: its tokens then ``<end_of_segment>``, causal, with CE labels.
- 2D condition: a clean VAE split (t = 0) and/or a ViT split, each ``full`` attention.
- 2D target: a noisy VAE split (``noise`` attention) at a sampled flow time t.

Image splits are ``<vision_start>`` + tokens + ``<vision_end>``; the whole split shares
one RoPE position, a clean split advances the position counter after it, a noisy one
does not (BAGEL's rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from modus_mega.config import DataConfig, ModelConfig, TimestepConfig
from modus_mega.flow import sample_timesteps
from modus_mega.modalities import modality, modality_id
from modus_mega.model.inputs import TOKEN_TEXT, TOKEN_VAE, TOKEN_VIT
from modus_mega.ops.mask import SplitMode
from modus_mega.vocab import Vocabulary

IGNORE_LABEL = -100  # CE label of positions that predict nothing


@dataclass
class Sample:
    """One multimodal sample: 2D maps as images, 1D modalities as token ids.

    ``images`` maps a 2D modality to a float image [3, H, W] in [-1, 1]; ``tokens`` maps a
    1D modality to its ids in the extended vocabulary (no start marker, no end token).
    """

    key: str
    images: dict[str, Tensor] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)

    def available(self) -> list[str]:
        """Modalities present in this sample."""
        return [*self.images, *self.tokens]


@dataclass
class Document:
    """Per-token lists of one document plus its images, ready for packing."""

    key: str
    target: str  # the target modality
    origin: tuple[int, int, int] = (0, 0, 0)  # (epoch, shard, position in shard): rebuilds it on resume
    input_ids: list[int] = field(default_factory=list)  # vocabulary id of TEXT tokens, 0 elsewhere
    token_type: list[int] = field(default_factory=list)  # TOKEN_TEXT / TOKEN_VIT / TOKEN_VAE
    modality_ids: list[int] = field(default_factory=list)  # segment's modality per token
    position_ids: list[int] = field(default_factory=list)  # RoPE positions, from 0
    ce_labels: list[int] = field(default_factory=list)  # next 1D target token, or IGNORE_LABEL
    layout: list[tuple[SplitMode, int]] = field(default_factory=list)  # attention runs (ops.mask)
    vit_images: list[Tensor] = field(default_factory=list)  # [3, H, W] per ViT split, in order
    vae_images: list[Tensor] = field(default_factory=list)  # [3, H, W] per VAE split, in order
    vae_timesteps: list[float] = field(default_factory=list)  # flow time per VAE split (0: clean)
    next_position: int = 0  # RoPE position of the next token (a noisy split leaves it unchanged)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenGeometry:
    """How many tokens an image becomes, from the model config."""

    vit_patch: int  # pixels per ViT patch side
    vit_max_side: int  # ViT patches per side at most
    vae_cell: int  # pixels per 2D token side (VAE downsample x latent patch)
    vae_max_side: int  # 2D tokens per side at most

    @staticmethod
    def of(cfg: ModelConfig) -> "TokenGeometry":
        """The geometry implied by ``cfg``."""
        return TokenGeometry(
            vit_patch=cfg.vit.patch_size,
            vit_max_side=cfg.vit.max_patches_per_side,
            vae_cell=cfg.vae.downsample * cfg.latent_patch_size,
            vae_max_side=cfg.max_latent_size,
        )


def fit_image(image: Tensor, cell: int, max_cells: int) -> Tensor:
    """Resize [3, H, W] so both sides are multiples of ``cell`` and at most ``max_cells`` cells."""
    _, h, w = image.shape
    scale = min(1.0, max_cells * cell / max(h, w))
    new_h = max(cell, int(round(h * scale / cell)) * cell)
    new_w = max(cell, int(round(w * scale / cell)) * cell)
    if (new_h, new_w) == (h, w):
        return image
    return F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]


class DocumentBuilder:
    """Turns samples into documents; all randomness comes from the generator passed in."""

    def __init__(self, data: DataConfig, timesteps: TimestepConfig, model: ModelConfig, vocab: Vocabulary) -> None:
        self.data = data
        self.timesteps = timesteps
        self.geometry = TokenGeometry.of(model)
        self.vocab = vocab

    def build(self, sample: Sample, generator: torch.Generator) -> Document | None:
        """The document for ``sample``, or None if none of its modalities may be a target.

        The target is drawn by ``target_weights`` among the sample's modalities; with
        probability ``condition_dropout`` the document keeps no condition (unconditional
        generation, for classifier-free guidance), else the number of conditions is
        uniform in [0, min(max_conditions, available)] and their order random.
        """
        available = sample.available()
        targets = [m for m, w in self.data.target_weights.items() if w > 0 and m in available]
        if not targets:
            return None
        weights = torch.tensor([self.data.target_weights[m] for m in targets], dtype=torch.float64)
        target = targets[int(torch.multinomial(weights, 1, generator=generator))]
        others = [m for m in available if m != target]
        dropped = float(torch.rand((), generator=generator, dtype=torch.float64)) < self.data.condition_dropout
        num_conditions = 0 if dropped else _randint(min(self.data.max_conditions, len(others)) + 1, generator)
        order = torch.randperm(len(others), generator=generator)[:num_conditions].tolist()

        doc = Document(key=sample.key, target=target)
        for name in (others[i] for i in order):
            self._add_segment(doc, sample, name, is_target=False, generator=generator)
        self._add_segment(doc, sample, target, is_target=True, generator=generator)
        return doc

    # ------------------------------------------------------------------ segments

    def add_condition(self, doc: Document, sample: Sample, name: str) -> None:
        """Append ``sample``'s modality ``name`` as a condition segment: its marker, then its content."""
        self.add_marker(doc, name)
        self.add_condition_content(doc, name, sample.tokens.get(name), sample.images.get(name))

    def add_marker(self, doc: Document, name: str) -> None:
        """Append ``<start:{name}>`` (causal, no label): the start of any segment."""
        self._add_causal(doc, [self.vocab.start_marker(name)], name, supervised=False)

    def add_condition_content(self, doc: Document, name: str, ids: list[int] | None, image: Tensor | None) -> None:
        """Append a condition's content after its marker: 1D ``ids`` (causal, no end token), or
        ``image`` [3, H, W] as a clean VAE split and/or a ViT split (``data.condition_mode_2d``).

        Generation appends a finished target with this same call, so a generated target
        continues the sequence exactly as a condition of that modality does in training.
        """
        if modality(name).family == "1d":
            assert ids is not None, f"{name} is a 1D modality: its condition content is token ids"
            self._add_causal(doc, ids, name, supervised=False)
            return
        assert image is not None, f"{name} is a 2D modality: its condition content is an image"
        if self.data.condition_mode_2d in ("vae", "both"):
            self._add_vae_split(doc, image, name, 0.0, mode="full")
        if self.data.condition_mode_2d in ("vit", "both"):
            self._add_vit_split(doc, image, name)

    def _add_segment(self, doc: Document, sample: Sample, name: str, is_target: bool, generator: torch.Generator) -> None:
        if not is_target:
            self.add_condition(doc, sample, name)
            return
        self.add_marker(doc, name)
        if modality(name).family == "1d":
            ids = sample.tokens[name]
            # The marker predicts the first token; the last token predicts <end_of_segment>.
            doc.ce_labels[-1] = ids[0] if ids else self.vocab.end_of_segment_id
            self._add_causal(doc, [*ids, self.vocab.end_of_segment_id], name, supervised=True)
            return
        t = float(sample_timesteps(1, self.timesteps, generator)[0])
        self._add_vae_split(doc, sample.images[name], name, t, mode="noise")

    def _add_causal(self, doc: Document, ids: list[int], name: str, supervised: bool) -> None:
        """Causal 1D tokens; if supervised, each token's label is the token after it."""
        if not ids:
            return
        start = doc.next_position
        doc.next_position += len(ids)
        doc.input_ids += ids
        doc.token_type += [TOKEN_TEXT] * len(ids)
        doc.modality_ids += [modality_id(name)] * len(ids)
        doc.position_ids += range(start, start + len(ids))
        doc.ce_labels += ids[1:] + [IGNORE_LABEL] if supervised else [IGNORE_LABEL] * len(ids)
        _extend_layout(doc.layout, "causal", len(ids))

    def _add_split(self, doc: Document, token_type: int, num: int, name: str, mode: SplitMode, advance: bool) -> None:
        """<vision_start> + num tokens of ``token_type`` + <vision_end>, sharing one position."""
        position = doc.next_position
        if advance:
            doc.next_position += 1  # a noisy split does not advance: what follows reuses its position
        length = num + 2
        doc.input_ids += [self.vocab.vision_start_id] + [0] * num + [self.vocab.vision_end_id]
        doc.token_type += [TOKEN_TEXT] + [token_type] * num + [TOKEN_TEXT]
        doc.modality_ids += [modality_id(name)] * length
        doc.position_ids += [position] * length
        doc.ce_labels += [IGNORE_LABEL] * length
        doc.layout.append((mode, length))

    def _add_vae_split(self, doc: Document, image: Tensor, name: str, t: float, mode: SplitMode) -> None:
        g = self.geometry
        image = fit_image(image, g.vae_cell, g.vae_max_side)
        num = (image.shape[1] // g.vae_cell) * (image.shape[2] // g.vae_cell)
        self._add_split(doc, TOKEN_VAE, num, name, mode, advance=(mode != "noise"))
        doc.vae_images.append(image)
        doc.vae_timesteps.append(t)

    def _add_vit_split(self, doc: Document, image: Tensor, name: str) -> None:
        g = self.geometry
        image = fit_image(image, g.vit_patch, g.vit_max_side)
        num = (image.shape[1] // g.vit_patch) * (image.shape[2] // g.vit_patch)
        self._add_split(doc, TOKEN_VIT, num, name, "full", advance=True)
        doc.vit_images.append(image)


def _extend_layout(layout: list[tuple[SplitMode, int]], mode: SplitMode, length: int) -> None:
    """Append a run, merging consecutive causal runs."""
    if mode == "causal" and layout and layout[-1][0] == "causal":
        layout[-1] = ("causal", layout[-1][1] + length)
    else:
        layout.append((mode, length))


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))
