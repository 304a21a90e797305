"""Attention masks of packed sequences, in the column-interval form of DESIGN §4.

Legend: T = tokens in the packed sequence; q = query index, k = key index; both index the
same packed sequence.

Each key column k is visible to exactly one contiguous interval of query rows
``[lo[k], hi[k])``:

    key k lies in                              lo[k]   hi[k]
    a causal token (text, markers, 1D tokens)  k       end of k's sample
    a full split [s, e) (clean VAE, ViT)       s       end of k's sample
    a noise split [s, e) (noisy 2D target)     s       e

A sample (one document, DESIGN §3) is described by its runs: ``("causal", n)`` is n causal
tokens; ``("full", n)`` and ``("noise", n)`` are ONE split of n tokens, its two vision
markers included. Samples are packed back to back. Padding is a pseudo-document in which
every token sees only itself, so no real token sees padding and no padding row is empty.

``dense_mask_from_layout`` is the oracle: it spells out the DESIGN §4 predicate without
going through lo/hi, and the tests check that both forms agree.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

SplitMode = Literal["causal", "full", "noise"]
Layout = Sequence[Sequence[tuple[SplitMode, int]]]  # samples -> runs -> (mode, length)

_SPLIT_MODES: tuple[str, ...] = get_args(SplitMode)
_INT32_MAX = torch.iinfo(torch.int32).max


def _normalized_layout(samples: Layout) -> list[list[tuple[SplitMode, int]]]:
    """Validate a layout and return it as lists of ``(mode, int length)``."""
    layout: list[list[tuple[SplitMode, int]]] = []
    for sample_index, runs in enumerate(samples):
        if len(runs) == 0:
            raise ValueError(
                f"sample {sample_index} has no runs; give every sample at least one "
                f"(mode, length) run or leave the sample out"
            )
        normalized: list[tuple[SplitMode, int]] = []
        for run_index, run in enumerate(runs):
            where = f"sample {sample_index}, run {run_index}"
            if len(run) != 2:
                raise ValueError(f"{where}: expected a (mode, length) pair, got {run!r}")
            mode, length = run
            if mode not in _SPLIT_MODES:
                raise ValueError(f"{where}: unknown mode {mode!r}; use one of {_SPLIT_MODES}")
            if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
                raise ValueError(
                    f"{where}: length must be an integer >= 1, got {length!r}; "
                    f"a split counts its two vision markers, so it is never empty"
                )
            normalized.append((mode, int(length)))
        layout.append(normalized)
    return layout


def _check_non_negative(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _check_int32_range(end: int) -> None:
    if end > _INT32_MAX:
        raise ValueError(
            f"positions reach {end}, beyond int32 ({_INT32_MAX}); lo/hi are int32, so pack "
            f"fewer tokens per micro-batch"
        )


def layout_num_tokens(samples: Layout) -> int:
    """Number of tokens of a layout: the sum of all run lengths."""
    return sum(length for runs in _normalized_layout(samples) for _, length in runs)


def lo_hi_for_layout(samples: Layout, offset: int = 0) -> tuple[Tensor, Tensor]:
    """Column intervals of samples packed back to back, starting at position ``offset``.

    Args:
        samples: one list of ``(mode, length)`` runs per sample (see the module docstring).
        offset: position of the first token in the micro-batch; every lo and hi is shifted by
            it, so the packer can place documents one after another and concatenate.

    Returns:
        ``lo, hi``: int32 tensors of shape [T] (T = total run length); key k is visible to
        the query rows ``lo[k] <= q < hi[k]`` (DESIGN §4).
    """
    layout = _normalized_layout(samples)
    offset = _check_non_negative("offset", offset)
    num_tokens = sum(length for runs in layout for _, length in runs)
    _check_int32_range(offset + num_tokens)

    lo_parts: list[Tensor] = []  # each [run length]
    hi_parts: list[Tensor] = []
    sample_start = offset
    for runs in layout:
        sample_end = sample_start + sum(length for _, length in runs)
        run_start = sample_start
        for mode, length in runs:
            if mode == "causal":
                lo_parts.append(torch.arange(run_start, run_start + length, dtype=torch.int32))
            else:
                lo_parts.append(torch.full((length,), run_start, dtype=torch.int32))
            run_hi = run_start + length if mode == "noise" else sample_end
            hi_parts.append(torch.full((length,), run_hi, dtype=torch.int32))
            run_start += length
        sample_start = sample_end

    if not lo_parts:
        return torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32)
    return torch.cat(lo_parts), torch.cat(hi_parts)


def padding_lo_hi(start: int, length: int) -> tuple[Tensor, Tensor]:
    """Column intervals of ``length`` padding tokens at positions ``start ...``.

    Each padding token sees only itself (``lo = k, hi = k + 1``): no real token sees padding,
    and padding rows are never empty, so no backend meets an all-masked row.

    Returns:
        ``lo, hi``: int32 tensors of shape [length].
    """
    start = _check_non_negative("start", start)
    length = _check_non_negative("length", length)
    _check_int32_range(start + length)
    lo = torch.arange(start, start + length, dtype=torch.int32)
    return lo, lo + 1


def dense_mask_from_layout(samples: Layout) -> Tensor:
    """The DESIGN §4 predicate written out verbatim, as a dense [T, T] bool (allowed[q, k]).

    ``same_sample(q, k) and (k <= q or q, k in the same full/noise split) and not (k in a
    noise split and q outside that split)``. It never uses lo/hi: it is the oracle the
    column-interval form is tested against. Memory is O(T^2): tests only.
    """
    layout = _normalized_layout(samples)
    sample_of: list[int] = []  # per token: index of its sample
    split_of: list[int] = []  # per token: id of its full/noise split, -1 for causal tokens
    in_noise: list[bool] = []  # per token: lies in a noise split
    num_splits = 0
    for sample_index, runs in enumerate(layout):
        for mode, length in runs:
            sample_of += [sample_index] * length
            if mode == "causal":
                split_of += [-1] * length
            else:
                split_of += [num_splits] * length
                num_splits += 1
            in_noise += [mode == "noise"] * length

    sample_t = torch.tensor(sample_of, dtype=torch.int64)  # [T]
    split_t = torch.tensor(split_of, dtype=torch.int64)  # [T]
    noise_t = torch.tensor(in_noise, dtype=torch.bool)  # [T]
    position = torch.arange(len(sample_of))
    q_pos, k_pos = position[:, None], position[None, :]  # [T, 1], [1, T]

    same_sample = sample_t[:, None] == sample_t[None, :]
    same_split = (split_t[:, None] == split_t[None, :]) & (split_t[None, :] >= 0)
    k_in_noise_q_outside = noise_t[None, :] & (split_t[:, None] != split_t[None, :])
    return same_sample & ((k_pos <= q_pos) | same_split) & ~k_in_noise_q_outside  # [T, T]


def check_lo_hi(lo: Tensor, hi: Tensor) -> int:
    """Check that ``lo, hi`` are two int32 vectors of one length on one device; return T.

    Values are not read here (that would synchronise a GPU); the packer guarantees them.
    """
    if not isinstance(lo, Tensor) or not isinstance(hi, Tensor):
        raise ValueError(
            f"lo and hi must be tensors, got {type(lo).__name__} and {type(hi).__name__}"
        )
    if lo.dim() != 1 or lo.shape != hi.shape:
        raise ValueError(
            f"lo and hi must be vectors of one length [T], got shapes {tuple(lo.shape)} and "
            f"{tuple(hi.shape)}"
        )
    if lo.dtype != torch.int32 or hi.dtype != torch.int32:
        raise ValueError(
            f"lo and hi must be int32 (the kernel's format), got {lo.dtype} and {hi.dtype}; "
            f"convert them with .to(torch.int32)"
        )
    if lo.device != hi.device:
        raise ValueError(f"lo and hi must be on one device, got {lo.device} and {hi.device}")
    return lo.shape[0]


def check_query_rows(num_tokens: int, q_offset: int, num_queries: int | None) -> int:
    """Check a query range over a cache (``AttentionBackend.prepare``) and return Tq.

    The queries are the rows ``q_offset .. q_offset + Tq - 1`` of the ``num_tokens`` keys;
    ``num_queries`` None means the last rows (Tq = T - q_offset).

    Raises:
        ValueError: a negative offset or count, or rows past the keys.
    """
    q_offset = _check_non_negative("q_offset", q_offset)
    if num_queries is None:
        num_queries = num_tokens - q_offset
    num_queries = _check_non_negative("num_queries", num_queries)
    if q_offset + num_queries > num_tokens:
        raise ValueError(
            f"the query rows [{q_offset}, {q_offset + num_queries}) run past the {num_tokens} "
            f"keys; the queries must be rows of the keys (q_offset + num_queries <= T), so "
            f"append their own keys to the cache first"
        )
    return num_queries


def cache_boundaries(lo: Tensor) -> Tensor:
    """Where a KV cache may end: bool [T + 1], True at s iff no query row before s sees a
    key at or after s (``lo[k] >= s`` for every k >= s).

    Then the rows [0, s) and every layer's keys and values there are the same with or without
    the tokens from s on, so they can be cached and the rest run as queries with
    ``q_offset = s``. True at 0, T, sample starts, before and after every causal token, at
    the start and end of every split; False strictly inside a full or noise split (its
    earlier tokens see its later ones). Attention itself is exact at any offset; this is
    the rule for the cache (DESIGN §8).
    """
    if lo.dim() != 1:
        raise ValueError(f"lo must be a vector [T], got shape {tuple(lo.shape)}")
    lo64 = lo.detach().to("cpu", torch.int64)  # [T]
    suffix_min_lo = torch.cummin(lo64.flip(0), dim=0).values.flip(0)  # [T]: min lo over k..T-1
    split = torch.arange(lo64.shape[0] + 1)  # [T + 1]
    tail = torch.cat([suffix_min_lo, torch.tensor([torch.iinfo(torch.int64).max])])
    return tail >= split


def dense_mask_from_lo_hi(lo: Tensor, hi: Tensor) -> Tensor:
    """Expand column intervals into a dense [T, T] bool: ``allowed[q, k] = lo[k] <= q < hi[k]``."""
    num_tokens = check_lo_hi(lo, hi)
    q_pos = torch.arange(num_tokens, device=lo.device)[:, None]  # [T, 1]
    return (lo[None, :] <= q_pos) & (q_pos < hi[None, :])  # [T, T]


def independent_blocks(lo: Tensor, hi: Tensor) -> list[tuple[int, int]]:
    """Split [0, T) into maximal ranges ``[a, b)`` that never attend across each other.

    A boundary b (0 < b < T) is valid iff every key k < b has ``hi[k] <= b`` (no query at or
    after b sees it) and every key k >= b has ``lo[k] >= b`` (no query before b sees it).
    Sample starts and every padding token are such boundaries. Attention can therefore be
    computed range by range with the exact same result.

    Returns:
        The ranges in order, covering [0, T); empty when T == 0.
    """
    num_tokens = check_lo_hi(lo, hi)
    if num_tokens == 0:
        return []
    lo64 = lo.detach().to("cpu", torch.int64)  # [T]
    hi64 = hi.detach().to("cpu", torch.int64)  # [T]
    prefix_max_hi = torch.cummax(hi64, dim=0).values  # [T]: max hi over keys 0..k
    suffix_min_lo = torch.cummin(lo64.flip(0), dim=0).values.flip(0)  # [T]: min lo over keys k..T-1
    boundary = torch.arange(1, num_tokens)  # candidate b, [T - 1]
    valid = (prefix_max_hi[:-1] <= boundary) & (suffix_min_lo[1:] >= boundary)
    cuts = [0, *boundary[valid].tolist(), num_tokens]
    return list(zip(cuts[:-1], cuts[1:]))


def sample_random_layout(
    rng: random.Random,
    max_samples: int = 4,
    max_runs: int = 6,
    max_run_length: int = 12,
) -> list[list[tuple[SplitMode, int]]]:
    """Draw a random layout for tests and benchmarks of attention backends.

    Modes are drawn independently per run, so layouts go beyond what the packer emits
    (adjacent splits, samples that start or end with a noise split); one run in three has
    length 1 so single-token splits and samples are common.
    """
    if min(max_samples, max_runs, max_run_length) < 1:
        raise ValueError(
            f"max_samples, max_runs and max_run_length must be >= 1, got "
            f"{max_samples}, {max_runs}, {max_run_length}"
        )
    layout: list[list[tuple[SplitMode, int]]] = []
    for _ in range(rng.randint(1, max_samples)):
        runs: list[tuple[SplitMode, int]] = []
        for _ in range(rng.randint(1, max_runs)):
            mode: SplitMode = rng.choice(_SPLIT_MODES)  # type: ignore[assignment]
            length = 1 if rng.random() < 1 / 3 else rng.randint(1, max_run_length)
            runs.append((mode, length))
        layout.append(runs)
    return layout
