"""Vector quantizers for the five feature modalities: features <-> codebook tokens, both ways.

One ``FeatureQuantizer`` per feature modality, its codes living in that modality's codebook
range of the extended vocabulary (``vocab.codebooks[name]``, ``codebook_size`` ids).

- Local features [gh, gw, D]: one token per patch, row-major (plain VQ, one codebook).
- Global features [D]: a fixed run of ``num_stages`` tokens by **residual quantisation**:
  stage s quantises what stages 0..s-1 left over, each with its own codebook of
  ``codebook_size`` entries; the decoded vector is the sum of the chosen entries. All
  stages share the modality's id range; a token's position in the run says which stage's
  codebook it indexes. Residual (rather than product) quantisation puts the coarse
  description first, which suits autoregressive generation: a truncated run still decodes
  to a sensible vector, and the first token alone is a plain VQ of the feature.

Codebooks are trained by k-means (k-means++ seeding, Lloyd iterations, empty clusters
re-seeded at the worst-fit points), deterministic for a seed; ``python -m
modus_mega.datasets.train_vq`` trains all five from shards. Codebooks are stored as
safetensors (``{modality}.safetensors``, tensor ``codebooks`` [num_stages, K, D]).

Shapes: N vectors, D feature width, K codebook size, S stages (tokens per global feature).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from modus_mega.modalities import feature_modalities, modality
from modus_mega.vocab import IdRange, Vocabulary

FORMAT_VERSION = "1"
_CHUNK = 8192  # rows per distance block: bounds memory at _CHUNK x K floats

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _as_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x).to(device=device, dtype=dtype)


def _like(result: torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    return result.cpu().numpy() if isinstance(reference, np.ndarray) else result


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index int64 [N], squared distance [N]) of the nearest centroid [K, D] to each row of x [N, D]."""
    c_norm = (centroids * centroids).sum(1)  # [K]
    indices, distances = [], []
    for block in x.split(_CHUNK):
        d2 = (block * block).sum(1, keepdim=True) - 2.0 * block @ centroids.T + c_norm  # [n, K]
        value, index = d2.min(1)
        indices.append(index)
        distances.append(value.clamp_min(0.0))
    return torch.cat(indices), torch.cat(distances)


def kmeans(
    x: torch.Tensor, k: int, iterations: int, generator: torch.Generator, progress: tqdm | None = None
) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations on x [N, D]; returns centroids [k, D]."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} vectors, got {n}; use more samples or a smaller codebook")
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centroids[0] = x[first]
    min_d2 = ((x - x[first]) ** 2).sum(1)  # [N] distance to the nearest chosen centroid
    for j in range(1, k):
        total = min_d2.sum()
        if total <= 0:  # fewer distinct points than k: duplicate the first centroid
            centroids[j:] = centroids[0]
            break
        pick = int(torch.multinomial(min_d2 / total, 1, generator=generator))
        centroids[j] = x[pick]
        min_d2 = torch.minimum(min_d2, ((x - x[pick]) ** 2).sum(1))
    for _ in range(iterations):
        assignment, d2 = nearest(x, centroids)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        updated = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # re-seed empty clusters at the points that fit worst
            worst = d2.topk(empty.numel()).indices
            updated[empty] = x[worst]
        converged = torch.equal(updated, centroids)
        centroids = updated
        if progress is not None:
            progress.update(1)
        if converged:
            break
    return centroids


class FeatureQuantizer:
    """Residual vector quantizer of one feature modality (``num_stages`` = 1 for local features)."""

    def __init__(self, modality_name: str, codebooks: torch.Tensor) -> None:
        kind = modality(modality_name).kind
        if kind not in ("feature_global", "feature_local"):
            raise ValueError(f"{modality_name!r} is not a feature modality; feature modalities: {feature_modalities()}")
        if codebooks.ndim != 3:
            raise ValueError(f"codebooks must be [num_stages, K, D], got {tuple(codebooks.shape)}")
        if kind == "feature_local" and codebooks.shape[0] != 1:
            raise ValueError(f"{modality_name} is a local feature: one token per patch needs 1 stage, got {codebooks.shape[0]}")
        self.modality = modality_name
        self.kind = kind
        self.codebooks = codebooks.float().contiguous()  # [S, K, D]

    @property
    def num_stages(self) -> int:
        """Tokens per feature vector (the global token run length; 1 for local features)."""
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        """Entries K per stage; must equal the modality's codebook range in the vocabulary."""
        return self.codebooks.shape[1]

    @property
    def feature_dim(self) -> int:
        """Width D of the features."""
        return self.codebooks.shape[2]

    def encode(self, features: ArrayT) -> ArrayT:
        """Features [..., D] -> codes int64 [..., S] (stage order: coarse to fine)."""
        x = _as_tensor(features, torch.float32, self.codebooks.device)
        if x.shape[-1] != self.feature_dim:
            raise ValueError(f"{self.modality}: features have width {x.shape[-1]}, the codebook {self.feature_dim}")
        residual = x.reshape(-1, self.feature_dim)
        codes = []
        for codebook in self.codebooks:
            index, _ = nearest(residual, codebook)
            codes.append(index)
            residual = residual - codebook[index]
        return _like(torch.stack(codes, 1).reshape(*x.shape[:-1], self.num_stages), features)  # type: ignore[return-value]

    def decode(self, codes: ArrayT) -> ArrayT:
        """Codes int64 [..., s] with s <= S (a prefix of the stages) -> features float32 [..., D]."""
        c = _as_tensor(codes, torch.int64, self.codebooks.device)
        if c.shape[-1] > self.num_stages:
            raise ValueError(f"{self.modality}: {c.shape[-1]} codes per vector but only {self.num_stages} stages")
        if c.numel() and (c.min() < 0 or c.max() >= self.codebook_size):
            raise ValueError(f"{self.modality}: codes must lie in [0, {self.codebook_size})")
        out = torch.zeros(*c.shape[:-1], self.feature_dim, device=self.codebooks.device)
        for stage in range(c.shape[-1]):
            out = out + self.codebooks[stage][c[..., stage]]
        return _like(out, codes)  # type: ignore[return-value]

    def tokenize(self, features: np.ndarray, vocab: Vocabulary) -> list[int]:
        """Vocabulary ids of one sample's feature: global [D] -> S ids; local [gh, gw, D] -> gh*gw ids."""
        expected = 1 if self.kind == "feature_global" else 3
        if features.ndim != expected:
            raise ValueError(f"{self.modality}: expected a {expected}-D feature, got shape {features.shape}")
        start = self.id_range(vocab).start
        return (self.encode(features).reshape(-1) + start).tolist()

    def detokenize(self, ids: Sequence[int], vocab: Vocabulary, grid: tuple[int, int] | None = None) -> np.ndarray:
        """Inverse of ``tokenize``: global -> [D] (a shorter run decodes its stages); local -> [gh, gw, D]."""
        id_range = self.id_range(vocab)
        codes = np.asarray(list(ids), dtype=np.int64) - id_range.start
        if self.kind == "feature_global":
            return self.decode(codes[None, : self.num_stages])[0]
        if grid is None or grid[0] * grid[1] != codes.size:
            raise ValueError(f"{self.modality}: {codes.size} local tokens do not fill the grid {grid}")
        return self.decode(codes.reshape(*grid, 1))

    def id_range(self, vocab: Vocabulary) -> IdRange:
        """This modality's codebook ids in ``vocab``; raises if the sizes disagree."""
        id_range = vocab.codebooks[self.modality]
        if len(id_range) != self.codebook_size:
            raise ValueError(
                f"{self.modality}: codebook has {self.codebook_size} entries but model.vocab.codebook_size is "
                f"{len(id_range)}; retrain with `python -m modus_mega.datasets.train_vq --codebook-size {len(id_range)}`"
            )
        return id_range

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the codebooks to ``path`` (safetensors) with the modality in the metadata."""
        save_file(
            {"codebooks": self.codebooks.cpu().contiguous()},
            os.fspath(path),
            metadata={"modality": self.modality, "format_version": FORMAT_VERSION},
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> FeatureQuantizer:
        """Read a quantizer written by ``save``."""
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format_version") != FORMAT_VERSION or "modality" not in metadata:
            raise ValueError(f"{path} is not a modus_mega codebook file (format {FORMAT_VERSION})")
        tensors = load_file(os.fspath(path), device=str(device))
        return cls(metadata["modality"], tensors["codebooks"])


def train_quantizer(
    modality_name: str,
    vectors: np.ndarray | torch.Tensor,
    codebook_size: int,
    num_stages: int = 1,
    iterations: int = 20,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FeatureQuantizer:
    """Fit ``num_stages`` residual codebooks of ``codebook_size`` entries to vectors [N, D]."""
    x = _as_tensor(vectors, torch.float32, torch.device(device))
    if x.ndim != 2:
        raise ValueError(f"train_quantizer wants vectors [N, D], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{modality_name}: training vectors contain NaN or inf")
    generator = torch.Generator(device=x.device).manual_seed(seed)
    residual = x
    codebooks = []
    with tqdm(total=num_stages * iterations, desc=f"k-means {modality_name}", disable=not progress, unit="iter") as bar:
        for _ in range(num_stages):
            centroids = kmeans(residual, codebook_size, iterations, generator, bar)
            index, _ = nearest(residual, centroids)
            residual = residual - centroids[index]
            codebooks.append(centroids)
    return FeatureQuantizer(modality_name, torch.stack(codebooks))


def relative_error(quantizer: FeatureQuantizer, vectors: np.ndarray | torch.Tensor) -> float:
    """Reconstruction MSE of vectors [N, D] divided by their variance (0 perfect, 1 = the mean)."""
    x = _as_tensor(vectors, torch.float32, quantizer.codebooks.device)
    reconstruction = quantizer.decode(quantizer.encode(x))
    return float(((x - reconstruction) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp_min(1e-12))


def load_quantizers(
    directory: str | os.PathLike[str], vocab: Vocabulary, modalities: Iterable[str] | None = None
) -> dict[str, FeatureQuantizer]:
    """Load ``{modality}.safetensors`` for each modality (None: every feature modality), checking sizes against ``vocab``."""
    quantizers = {}
    for name in feature_modalities() if modalities is None else modalities:
        path = Path(directory) / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"no codebook {path}; train one with `python -m modus_mega.datasets.train_vq`")
        quantizer = FeatureQuantizer.load(path)
        if quantizer.modality != name:
            raise ValueError(f"{path} holds the codebook of {quantizer.modality}, not {name}")
        quantizer.id_range(vocab)  # raises if the codebook size disagrees with the vocabulary
        quantizers[name] = quantizer
    return quantizers
