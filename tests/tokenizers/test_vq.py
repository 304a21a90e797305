"""Feature quantizers: k-means against brute force, error vs codebook size, ids, files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modus_mega.config import load_config
from modus_mega.datasets import synth
from modus_mega.data.shard_format import SkipCounter
from modus_mega.data.shard_reader import iter_shard, read_index
from modus_mega.datasets import train_vq
from modus_mega.tokenizers import ModalityTokenizers
from modus_mega.tokenizers.text import train_tiny_text_tokenizer
from modus_mega.tokenizers.vq import FeatureQuantizer, kmeans, nearest, relative_error, train_quantizer
from modus_mega.vocab import build_vocabulary

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.json"


def _clustered(n: int = 2000, dim: int = 12, clusters: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3.0
    return (centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, dim)) * 0.3).astype(np.float32)


def test_nearest_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(500, 7, generator=generator), torch.randn(33, 7, generator=generator)
    index, d2 = nearest(x, centroids)
    reference = torch.cdist(x.double(), centroids.double())
    assert torch.equal(index, reference.argmin(1))
    assert torch.allclose(d2.double(), reference.min(1).values ** 2, atol=1e-4)


def test_error_falls_as_the_codebook_grows() -> None:
    vectors = _clustered()
    errors = [relative_error(train_quantizer("dinov2_local", vectors, k, iterations=15), vectors) for k in (4, 16, 64)]
    assert all(later < 0.8 * earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1


def test_residual_stages_refine() -> None:
    vectors = _clustered(n=1500, dim=16, clusters=300, seed=1)
    quantizer = train_quantizer("clip_global", vectors, 16, num_stages=4, iterations=10)
    codes = quantizer.encode(vectors)
    assert codes.shape == (len(vectors), 4) and codes.dtype == np.int64
    errors = [float(((quantizer.decode(codes[:, :s]) - vectors) ** 2).mean()) for s in range(1, 5)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    # Stage 1 alone is a plain k-means VQ: its decode is the nearest first-stage centroid.
    first = quantizer.codebooks[0].numpy()
    brute = ((vectors[:, None, :] - first[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(codes[:, 0], brute)


def test_training_is_deterministic() -> None:
    vectors = _clustered(n=800)
    a = train_quantizer("imagebind_global", vectors, 16, num_stages=2, seed=3)
    b = train_quantizer("imagebind_global", vectors, 16, num_stages=2, seed=3)
    c = train_quantizer("imagebind_global", vectors, 16, num_stages=2, seed=4)
    assert torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_tokens_in_range_and_back(tmp_path: Path) -> None:
    vocab = build_vocabulary(load_config(TINY).model.vocab)
    k = len(vocab.codebooks["dinov2_local"])
    rng = np.random.default_rng(0)
    local = train_quantizer("dinov2_local", rng.normal(size=(400, 6)).astype(np.float32), k)
    feature = rng.normal(size=(3, 5, 6)).astype(np.float32)
    ids = local.tokenize(feature, vocab)
    assert len(ids) == 15 and all(i in vocab.codebooks["dinov2_local"] for i in ids)
    back = local.detokenize(ids, vocab, grid=(3, 5))
    assert back.shape == (3, 5, 6)
    assert np.allclose(back, local.decode(local.encode(feature)))
    assert torch.is_tensor(local.decode(local.encode(torch.from_numpy(feature))))

    global_ = train_quantizer("clip_global", rng.normal(size=(300, 6)).astype(np.float32), k, num_stages=3)
    ids = global_.tokenize(feature[0, 0], vocab)
    assert len(ids) == 3 and all(i in vocab.codebooks["clip_global"] for i in ids)
    assert np.allclose(global_.detokenize(ids, vocab), global_.decode(global_.encode(feature[0, 0])))

    path = tmp_path / "clip_global.safetensors"
    global_.save(path)
    loaded = FeatureQuantizer.load(path)
    assert loaded.modality == "clip_global" and torch.equal(loaded.codebooks, global_.codebooks)
    with pytest.raises(ValueError, match="train_vq"):
        train_quantizer("clip_global", rng.normal(size=(300, 6)).astype(np.float32), k // 2).tokenize(feature[0, 0], vocab)


def test_errors() -> None:
    with pytest.raises(ValueError, match="at least k"):
        kmeans(torch.zeros(3, 2), 4, 1, torch.Generator())
    with pytest.raises(ValueError, match="1 stage"):
        FeatureQuantizer("dinov2_local", torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="not a feature modality"):
        FeatureQuantizer("caption", torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="NaN"):
        train_quantizer("clip_global", np.full((8, 2), np.nan, dtype=np.float32), 2)


def test_train_vq_cli_and_all_1d_tokenizers(tmp_path: Path) -> None:
    cfg = load_config(TINY).model.vocab
    vocab = build_vocabulary(cfg)
    config = synth.SynthConfig(image_size=24, feature_dim=8, feature_grid=2)
    synth.write_dataset(tmp_path / "shards", 40, config, samples_per_shard=16, progress=False)
    assert train_vq.main(["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "vq"),
                          "--codebook-size", str(cfg.codebook_size), "--tokens-per-global", "2", "--iterations", "5"]) == 0
    manifest = json.loads((tmp_path / "vq" / "vq.json").read_text())
    assert set(manifest["modalities"]) == set(vocab.codebooks)
    assert manifest["skips"]["samples_ok"] == 40

    counter = SkipCounter()
    samples = [s for shard in read_index(tmp_path / "shards") for s in iter_shard(shard.path, counter)]
    captions = [c for s in samples for c in s.modalities["caption"]]
    text_dir = train_tiny_text_tokenizer(captions, cfg.text_vocab_size, tmp_path / "text")
    tokenizers = ModalityTokenizers.load(vocab, text_dir, tmp_path / "vq")
    rng = np.random.default_rng(0)
    ranges = {
        "caption": [vocab.text],
        "detection": [vocab.text, vocab.coordinates],
        "grounding": [vocab.text, vocab.coordinates],
    }
    for sample in samples[:5]:
        for name, payload in sample.modalities.items():
            if name in ("rgb", "depth", "normal", "seg", "sam_seg", "canny", "sam_edge"):
                continue
            ids = tokenizers.encode(name, payload, rng)
            allowed = ranges.get(name, [vocab.codebooks.get(name)])
            assert ids and all(any(i in r for r in allowed) for i in ids), name
            decoded = tokenizers.decode(name, ids + [vocab.end_of_segment_id], 24, 24, grid=(2, 2))
            if name == "caption":
                assert decoded[0] in payload
            elif name == "detection":
                assert sorted(decoded.classes) == sorted(payload.classes)
                assert np.allclose(np.sort(decoded.boxes, 0), np.sort(payload.boxes, 0), atol=0.5 / 100 * 24 + 1e-4)
            elif name == "grounding":
                assert decoded.expressions[0] in payload.expressions
            else:
                assert decoded.shape == payload.shape
                assert len(ids) == (2 if name.endswith("_global") else 4)

