"""Array plumbing shared by the metrics: numpy or torch inputs, one image or a batch of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ArrayLike = Any  # a numpy array, a torch tensor (any device) or nested lists


def to_numpy(x: ArrayLike) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_items(x: ArrayLike | Sequence[ArrayLike], item_ndim: int) -> list[np.ndarray]:
    """Split a batch into items of ``item_ndim`` dimensions each.

    ``x`` is one item (``item_ndim`` dims), a stacked batch (``item_ndim + 1`` dims) or a
    list / tuple of items (which may differ in size, e.g. images of several resolutions).
    """
    if isinstance(x, (list, tuple)):
        items = [to_numpy(item) for item in x]
    else:
        array = to_numpy(x)
        items = [array] if array.ndim == item_ndim else list(array)
    for item in items:
        if item.ndim != item_ndim:
            raise ValueError(f"expected items of {item_ndim} dimensions, got shape {item.shape}")
    return items


def check_same_shapes(name: str, preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> None:
    """Raise ValueError unless predictions and targets pair up with equal shapes."""
    if len(preds) != len(targets):
        raise ValueError(f"{name}: {len(preds)} predictions for {len(targets)} targets")
    for i, (pred, target) in enumerate(zip(preds, targets)):
        if pred.shape != target.shape:
            raise ValueError(f"{name}: item {i} has prediction shape {pred.shape} but target shape {target.shape}")
