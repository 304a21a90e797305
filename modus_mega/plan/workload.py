"""What a packed micro-batch holds: documents, image splits, loss tokens, attention pairs.

Compute and memory depend on the token mix, not only on the token budget: ViT patches
run the vision tower, VAE images run the frozen encoder, 1D target tokens run the LM
head, and attention cost is the number of (query, key) pairs the MODUS mask allows
(DESIGN §4), which is set by document lengths, not by the budget. The mix is derived
exactly from the document rules (DESIGN §3, ``data/documents.py``) by enumerating every
document shape with its probability:

- the target is drawn by ``data.target_weights``; with probability
  ``data.condition_dropout`` a document has no condition, else the number of conditions
  is uniform in ``[0, min(max_conditions, 14)]``; conditions are a uniform subset of the
  other 14 modalities (every sample is assumed to carry all 15 modalities, as MODUS's
  pseudo-labelled data does), so the number of 2D conditions is hypergeometric;
- a 2D condition is ``<start:m>`` + a clean VAE split and/or a ViT split (``condition_mode_2d``),
  a 2D target ``<start:m>`` + a noisy VAE split, each split with its two markers;
  a 1D segment is ``<start:m>`` + ``tokens_1d`` tokens (+ ``<end_of_segment>`` as target);
- images are square: ``data.image_size`` for the procedural source, else the largest
  square that ``data.augment.max_pixels`` allows (the size most images are resized to),
  fitted to each tower's grid exactly as ``documents.fit_image`` does.

``tokens_1d`` (the mean length of a 1D segment) is the one assumption: the 1D tokenizers
emit between a few tokens (global features) and a patch grid (local features).

Per micro-batch, documents are treated as independent draws: expected values size the
compute, and quantities that size memory (ViT tokens, VAE images, CE tokens) are taken
at the mean plus ``PEAK_SIGMAS`` standard deviations, capped by what the budget can hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modus_mega.config import DataConfig, ModusConfig
from modus_mega.modalities import MODALITY_NAMES, modality
from modus_mega.ops.mask import SplitMode

PEAK_SIGMAS = 4.0  # memory is sized for micro-batches up to this many standard deviations above the mean

Runs = list[tuple[SplitMode, int]]  # one document's attention runs, as in ops.mask


def visible_pairs(runs: Runs) -> int:
    """(query, key) pairs one document's mask allows, from its runs (DESIGN §4, per key column).

    A causal key k sees rows [k, L), a full split [s, e) sees [s, L), a noise split [s, e)
    sees [s, e); L is the document length. Closed form per run, O(runs).
    """
    length = sum(n for _, n in runs)
    pairs, start = 0, 0
    for mode, n in runs:
        if mode == "causal":
            pairs += n * (length - start) - n * (n - 1) // 2
        elif mode == "full":
            pairs += n * (length - start)
        else:
            pairs += n * n
        start += n
    return pairs


def fitted_grid(side: int, cell: int, max_cells: int) -> int:
    """Cells per side of a square ``side``-pixel image fitted like ``documents.fit_image``."""
    scale = min(1.0, max_cells * cell / side)
    return max(cell, int(round(side * scale / cell)) * cell) // cell


def image_side(data: DataConfig) -> int:
    """Side of the square images the plan assumes (see the module docstring)."""
    return data.image_size if data.source == "procedural" else math.isqrt(data.augment.max_pixels)


@dataclass(frozen=True)
class DocumentMix:
    """Moments of one document's contents over the document distribution (module docstring)."""

    vae_grid: int  # 2D tokens per side of one VAE split
    vit_grid: int  # ViT patches per side of one ViT split
    vae_pixels: int  # image side the VAE encodes, in pixels
    tokens_1d: int  # assumed tokens of one 1D segment (markers excluded)
    max_tokens: int  # the longest possible document
    mean_tokens: float
    mean_pairs: float  # visible attention pairs of the decoder
    mean_vit_tokens: float
    var_vit_tokens: float
    mean_vit_images: float
    mean_vae_images: float
    var_vae_images: float
    mean_ce_tokens: float  # positions that predict a 1D target token
    var_ce_tokens: float
    max_vit_share: float  # largest share of a micro-batch that ViT patches can fill

    @property
    def vae_tokens_per_image(self) -> int:
        """2D tokens of one VAE split, markers excluded."""
        return self.vae_grid**2

    @property
    def vit_tokens_per_image(self) -> int:
        """ViT patches of one ViT split, markers excluded."""
        return self.vit_grid**2


def _document_runs(cfg: ModusConfig, target_2d: bool, num_2d: int, num_1d: int, tokens_1d: int, vae: int, vit: int) -> Runs:
    """Attention runs of one document shape (conditions first, target last; pairs do not depend on their order)."""
    mode = cfg.data.condition_mode_2d
    runs: Runs = []
    for _ in range(num_2d):
        runs.append(("causal", 1))
        if mode in ("vae", "both"):
            runs.append(("full", vae + 2))
        if mode in ("vit", "both"):
            runs.append(("full", vit + 2))
    runs += [("causal", 1 + tokens_1d)] * num_1d
    runs += [("causal", 1), ("noise", vae + 2)] if target_2d else [("causal", 1 + tokens_1d + 1)]
    return runs


def document_mix(cfg: ModusConfig, tokens_1d: int) -> DocumentMix:
    """Enumerate every document shape of ``cfg``'s data rules with its probability."""
    if tokens_1d < 1:
        raise ValueError(f"tokens_1d = {tokens_1d}: a 1D segment holds at least one token")
    model, data = cfg.model, cfg.data
    vae_cell = model.vae.downsample * model.latent_patch_size
    side = image_side(data)
    vae_grid = fitted_grid(side, vae_cell, model.max_latent_size)
    vit_grid = fitted_grid(side, model.vit.patch_size, model.vit.max_patches_per_side)
    vae, vit = vae_grid**2, vit_grid**2
    uses_vae = data.condition_mode_2d in ("vae", "both")
    uses_vit = data.condition_mode_2d in ("vit", "both")

    moments = {k: 0.0 for k in ("tokens", "pairs", "vit", "vit2", "vit_images", "vae_images", "vae_images2", "ce", "ce2")}
    max_tokens = 0
    weights = {m: w for m, w in data.target_weights.items() if w > 0}
    for target, weight in weights.items():
        target_2d = modality(target).family == "2d"
        others = [m for m in MODALITY_NAMES if m != target]
        others_2d = sum(modality(m).family == "2d" for m in others)
        others_1d = len(others) - others_2d
        max_conditions = min(data.max_conditions, len(others))
        for num_conditions in range(max_conditions + 1):
            p_count = (1 - data.condition_dropout) / (max_conditions + 1) + data.condition_dropout * (num_conditions == 0)
            for num_2d in range(max(0, num_conditions - others_1d), min(num_conditions, others_2d) + 1):
                num_1d = num_conditions - num_2d
                p_mix = math.comb(others_2d, num_2d) * math.comb(others_1d, num_1d) / math.comb(len(others), num_conditions)
                p = weight / sum(weights.values()) * p_count * p_mix
                runs = _document_runs(cfg, target_2d, num_2d, num_1d, tokens_1d, vae, vit)
                length = sum(n for _, n in runs)
                max_tokens = max(max_tokens, length)
                vit_tokens = num_2d * vit if uses_vit else 0
                vae_images = num_2d * uses_vae + target_2d
                ce = 0 if target_2d else tokens_1d + 1  # the marker and every token predict the next one
                moments["tokens"] += p * length
                moments["pairs"] += p * visible_pairs(runs)
                moments["vit"] += p * vit_tokens
                moments["vit2"] += p * vit_tokens**2
                moments["vit_images"] += p * num_2d * uses_vit
                moments["vae_images"] += p * vae_images
                moments["vae_images2"] += p * vae_images**2
                moments["ce"] += p * ce
                moments["ce2"] += p * ce**2
    condition_2d = 1 + (vae + 2) * uses_vae + (vit + 2) * uses_vit
    return DocumentMix(
        vae_grid=vae_grid,
        vit_grid=vit_grid,
        vae_pixels=vae_grid * vae_cell,
        tokens_1d=tokens_1d,
        max_tokens=max_tokens,
        mean_tokens=moments["tokens"],
        mean_pairs=moments["pairs"],
        mean_vit_tokens=moments["vit"],
        var_vit_tokens=moments["vit2"] - moments["vit"] ** 2,
        mean_vit_images=moments["vit_images"],
        mean_vae_images=moments["vae_images"],
        var_vae_images=moments["vae_images2"] - moments["vae_images"] ** 2,
        mean_ce_tokens=moments["ce"],
        var_ce_tokens=moments["ce2"] - moments["ce"] ** 2,
        max_vit_share=vit / condition_2d if uses_vit else 0.0,
    )


@dataclass(frozen=True)
class MicroBatch:
    """Contents of one packed micro-batch of ``tokens`` tokens: expected values and memory peaks."""

    tokens: int  # the budget T; padding runs through every layer too
    packing_efficiency: float  # real tokens / T
    documents: float  # expected documents per micro-batch
    attention_pairs: float  # decoder mask pairs of the real documents plus one per padding token
    vit_tokens: float
    vit_pairs: float  # ViT attention pairs (each image attends to itself)
    vae_images: float
    ce_tokens: float
    peak_vit_tokens: float
    peak_vae_images: float
    peak_ce_tokens: float
    vae_pixels: int  # side of the images the VAE encodes

    @property
    def real_tokens(self) -> float:
        """Tokens of real documents (what throughput counts)."""
        return self.tokens * self.packing_efficiency


def default_packing_efficiency(mix: DocumentMix, token_budget: int) -> float:
    """Real tokens / budget of first-fit packing: about half a mean document is lost per micro-batch."""
    return max(0.0, 1.0 - mix.mean_tokens / (2.0 * token_budget))


def micro_batch(mix: DocumentMix, token_budget: int, packing_efficiency: float | None = None) -> MicroBatch:
    """Expected contents and memory peaks of a ``token_budget`` micro-batch of documents drawn from ``mix``."""
    if token_budget < mix.max_tokens:
        raise ValueError(
            f"token budget {token_budget} is below the longest document ({mix.max_tokens} tokens); "
            "the packer would drop those documents"
        )
    efficiency = default_packing_efficiency(mix, token_budget) if packing_efficiency is None else packing_efficiency
    if not 0 < efficiency <= 1:
        raise ValueError(f"packing efficiency {efficiency} must lie in (0, 1]")
    real = token_budget * efficiency
    docs = real / mix.mean_tokens

    def peak(mean: float, var: float, cap: float) -> float:
        return min(cap, docs * mean + PEAK_SIGMAS * math.sqrt(docs * var))

    vae_split = mix.vae_tokens_per_image + 3  # its tokens, two markers and the segment's start marker
    return MicroBatch(
        tokens=token_budget,
        packing_efficiency=efficiency,
        documents=docs,
        attention_pairs=docs * mix.mean_pairs + (token_budget - real),
        vit_tokens=docs * mix.mean_vit_tokens,
        vit_pairs=docs * mix.mean_vit_images * mix.vit_tokens_per_image**2,
        vae_images=docs * mix.mean_vae_images,
        ce_tokens=docs * mix.mean_ce_tokens,
        peak_vit_tokens=peak(mix.mean_vit_tokens, mix.var_vit_tokens, token_budget * mix.max_vit_share),
        peak_vae_images=peak(mix.mean_vae_images, mix.var_vae_images, token_budget / vae_split),
        peak_ce_tokens=peak(mix.mean_ce_tokens, mix.var_ce_tokens, float(token_budget)),
        vae_pixels=mix.vae_pixels,
    )
