"""Feature metrics: cosine similarity to the ground truth, and k-NN retrieval of scene classes.

Cosine protocol: the cosine between each generated feature vector and its ground truth along the
last axis, averaged over everything else (global features [N, D]: over scenes; local features
[N, g, g, D]: over scenes and grid cells). A zero vector has cosine 0 with anything.

k-NN protocol (the stand-in for the paper's ImageNet k-NN classification of generated global
features): the gallery is the ground-truth features of the evaluation scenes with their class
labels, the queries are the features generated for those scenes; with ``leave_one_out`` (the
default) query i never sees gallery item i, its own scene, so a query is classified only by
other scenes. Neighbours are the k gallery items of highest cosine similarity; each casts one
vote for its class (majority vote, as scikit-learn's uniform ``KNeighborsClassifier``); classes
rank by votes, ties to the smaller label. Top-1 is right when the query's class ranks first,
top-5 when it is among the first five classes that received a vote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modus_mega.eval.metrics.arrays import ArrayLike, to_numpy

DEFAULT_K = 10  # neighbours; the evaluation sets are small (tens to hundreds of scenes)


@dataclass(frozen=True)
class RetrievalMetrics:
    """k-NN classification accuracies of the queries."""

    top1: float
    top5: float
    k: int  # neighbours actually used (at most the gallery size)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def cosine_similarity(pred: ArrayLike, target: ArrayLike) -> float:
    """Mean cosine between ``pred`` and ``target`` ([..., D], same shapes) along the last axis."""
    p, t = to_numpy(pred).astype(np.float64), to_numpy(target).astype(np.float64)
    if p.shape != t.shape or p.ndim < 1:
        raise ValueError(f"cosine_similarity: shapes differ: {p.shape} vs {t.shape}")
    return float((_unit(p) * _unit(t)).sum(-1).mean())


def knn_retrieval(
    queries: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike,
    gallery_labels: ArrayLike,
    k: int = DEFAULT_K,
    leave_one_out: bool = True,
) -> RetrievalMetrics:
    """Top-1 / top-5 k-NN classification of queries [N, D] by a labelled gallery [M, D] (module protocol).

    Labels are non-negative integers; ``leave_one_out`` needs N == M (query i is scene i).
    """
    q, g = _unit(to_numpy(queries).astype(np.float64)), _unit(to_numpy(gallery).astype(np.float64))
    q_labels, g_labels = to_numpy(query_labels).astype(np.int64), to_numpy(gallery_labels).astype(np.int64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"knn_retrieval: expected [N, D] queries and [M, D] gallery, got {q.shape} and {g.shape}")
    if len(q_labels) != len(q) or len(g_labels) != len(g):
        raise ValueError("knn_retrieval: one label per query and per gallery item")
    if leave_one_out and len(q) != len(g):
        raise ValueError(
            f"knn_retrieval: leave_one_out pairs query i with gallery item i; got {len(q)} queries, {len(g)} items"
        )
    if k < 1:
        raise ValueError(f"knn_retrieval: k must be >= 1, got {k}")
    similarity = q @ g.T  # [N, M]
    if leave_one_out:
        np.fill_diagonal(similarity, -np.inf)
    k = min(k, similarity.shape[1] - int(leave_one_out))
    if k < 1:
        raise ValueError("knn_retrieval: the gallery has no item to retrieve")
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # [N, k]
    num_classes = int(max(q_labels.max(initial=0), g_labels.max(initial=0))) + 1
    votes = np.zeros((len(q), num_classes), dtype=np.int64)
    np.add.at(votes, (np.arange(len(q))[:, None], g_labels[neighbours]), 1)
    ranking = np.argsort(-votes, axis=1, kind="stable")  # ties keep the smaller label first
    rank_of_true = (ranking == q_labels[:, None]).argmax(1)
    voted = votes[np.arange(len(q)), q_labels] > 0
    return RetrievalMetrics(
        top1=float(np.mean(rank_of_true == 0)),
        top5=float(np.mean((rank_of_true < 5) & voted)),
        k=k,
    )
