"""Feature metrics: cosine by hand; k-NN retrieval against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from modus_mega.eval.metrics.features import cosine_similarity, knn_retrieval


def test_cosine_by_hand_and_on_local_grids() -> None:
    target = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    pred = np.array([[5.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])  # same direction, orthogonal, opposite
    assert cosine_similarity(pred, target) == pytest.approx(0.0)
    assert cosine_similarity(torch.tensor(target), target) == pytest.approx(1.0)
    assert cosine_similarity(np.zeros_like(target), target) == 0.0
    rng = np.random.default_rng(0)
    local = rng.normal(size=(3, 4, 4, 8))  # [N, g, g, D]
    assert cosine_similarity(local, local) == pytest.approx(1.0)
    assert abs(cosine_similarity(rng.permutation(local.reshape(-1, 8)).reshape(local.shape), local)) < 0.2


def test_knn_matches_scikit_learn_leave_one_out() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=40)
    gallery = rng.normal(size=(4, 16))[labels] + rng.normal(scale=1.5, size=(40, 16))  # noisy class centres
    queries = gallery + rng.normal(scale=0.5, size=gallery.shape)
    for k in (1, 5, 7):
        predicted = []
        for i in range(len(queries)):
            others = np.arange(len(gallery)) != i
            classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
            predicted.append(classifier.fit(gallery[others], labels[others]).predict(queries[i : i + 1])[0])
        expected = np.mean(np.array(predicted) == labels)
        result = knn_retrieval(queries, labels, gallery, labels, k=k)
        assert result.top1 == pytest.approx(expected)
        assert result.k == k
    assert 0.0 < result.top1 < 1.0  # neither trivial nor perfect


def test_knn_top5_and_perfect_and_shuffled() -> None:
    # one query, 7 gallery items of classes 0..6 at decreasing similarity; k = 7: one vote each,
    # ties rank the smaller label first, so classes 0-4 are the top five
    gallery = np.array([[1.0, 0.1 * i] for i in range(7)])
    query = np.array([[1.0, 0.0]])
    for label, top1, top5 in ((0, 1.0, 1.0), (4, 0.0, 1.0), (5, 0.0, 0.0)):
        result = knn_retrieval(query, [label], gallery, np.arange(7), k=7, leave_one_out=False)
        assert (result.top1, result.top5) == (top1, top5)
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(5), 6)
    features = np.eye(5)[labels] * 10 + rng.normal(scale=0.1, size=(30, 5))  # well separated classes
    assert knn_retrieval(features, labels, features, labels, k=5).top1 == 1.0
    shuffled = rng.permutation(features)
    assert knn_retrieval(shuffled, labels, features, labels, k=5).top1 < 0.5


def test_knn_errors() -> None:
    with pytest.raises(ValueError, match="leave_one_out"):
        knn_retrieval(np.ones((2, 3)), [0, 1], np.ones((3, 3)), [0, 1, 0])
    with pytest.raises(ValueError, match="no item"):
        knn_retrieval(np.ones((1, 3)), [0], np.ones((1, 3)), [0])
