"""Reference attention: exact forward and backward in plain PyTorch (autograd).

Legend: T = tokens (keys), Tq = query rows, Hq / Hkv = query / key-value heads,
g = Hq // Hkv, D = head dim, t / tq = keys / query rows of one group.

Used by CPU runs and as the fp32 oracle of the other backends. Math runs in float32
(float64 inputs stay float64) and the output is cast back to q's dtype.

Blocking: a packed micro-batch is a sequence of independent ranges (documents, padding
tokens; ``mask.independent_blocks``) that never attend across each other, so attention is
computed range by range: no [T, T] tensor is ever built, masks and scores exist per range
(memory O(sum of t^2), kept for the backward when autograd records).
Consecutive small ranges are merged greedily into groups of at most ``max_group_tokens``
tokens (a range larger than that stays alone): 500 padding tokens then cost one iteration,
not 500. Merging is exact because the mask of a group is rebuilt from lo/hi, which already
forbids every pair across ranges.

Queries over a cache (``q_offset``): the groups are cut over the keys as above, and each
group takes the query rows that fall inside it; groups without query rows are skipped, so a
decode step costs one [tq, t] score block per group it touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from modus_mega.ops.attention import AttentionBackend, check_qkv
from modus_mega.ops.mask import check_lo_hi, check_query_rows, independent_blocks

DEFAULT_MAX_GROUP_TOKENS = 1024


@dataclass(frozen=True)
class ReferencePlan:
    """Per-micro-batch metadata of the reference backend."""

    lo: Tensor  # [T] int32
    hi: Tensor  # [T] int32
    group_sizes: tuple[int, ...]  # key counts of consecutive groups; they sum to T
    query_sizes: tuple[int, ...]  # query rows inside each group; they sum to Tq
    q_offset: int = 0  # absolute position of query row 0

    @property
    def num_tokens(self) -> int:
        """T, the keys this plan covers."""
        return self.lo.shape[0]

    @property
    def num_queries(self) -> int:
        """Tq, the query rows this plan covers."""
        return sum(self.query_sizes)


def group_blocks(blocks: list[tuple[int, int]], max_group_tokens: int) -> list[tuple[int, int]]:
    """Merge consecutive independent ranges greedily into groups of <= ``max_group_tokens``.

    A range longer than the limit forms a group of its own.
    """
    groups: list[tuple[int, int]] = []
    for start, end in blocks:
        if groups and end - groups[-1][0] <= max_group_tokens:
            groups[-1] = (groups[-1][0], end)
        else:
            groups.append((start, end))
    return groups


def plan_reference_attention(
    lo: Tensor,
    hi: Tensor,
    max_group_tokens: int = DEFAULT_MAX_GROUP_TOKENS,
    q_offset: int = 0,
    num_queries: int | None = None,
) -> ReferencePlan:
    """Validate ``lo, hi`` (int32 [T], ``0 <= lo <= hi <= T``) and the query rows
    ``[q_offset, q_offset + Tq)`` (``mask.check_query_rows``); split [0, T) into groups."""
    num_tokens = check_lo_hi(lo, hi)
    num_queries = check_query_rows(num_tokens, q_offset, num_queries)
    if max_group_tokens < 1:
        raise ValueError(f"max_group_tokens must be >= 1, got {max_group_tokens}")
    if num_tokens > 0:
        lo_cpu, hi_cpu = lo.detach().cpu(), hi.detach().cpu()
        bad = (lo_cpu < 0) | (lo_cpu > hi_cpu) | (hi_cpu > num_tokens)
        if bool(bad.any()):
            key = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"key {key} has lo={int(lo_cpu[key])}, hi={int(hi_cpu[key])}; every key needs "
                f"0 <= lo <= hi <= T = {num_tokens} (build lo/hi with ops.mask)"
            )
    groups = group_blocks(independent_blocks(lo, hi), max_group_tokens)
    q_end = q_offset + num_queries
    return ReferencePlan(
        lo=lo,
        hi=hi,
        group_sizes=tuple(end - start for start, end in groups),
        query_sizes=tuple(max(0, min(end, q_end) - max(start, q_offset)) for start, end in groups),
        q_offset=q_offset,
    )


def _group_attention(
    q: Tensor, k: Tensor, v: Tensor, lo: Tensor, hi: Tensor, row_start: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of one group's query rows, at positions ``row_start ...``, over its keys,
    in the working dtype.

    Args:
        q: [tq, Hq, D]; k, v: [t, Hkv, D]; lo, hi: [t] (positions in the whole sequence).

    Returns:
        ``out`` [tq, Hq, D] and the natural log-sum-exp of the scaled scores, ``lse`` [tq, Hq]
        (``-inf`` for a row that sees no key; such a row's output is 0).
    """
    num_tokens, num_q_heads, head_dim = q.shape  # num_tokens: the tq query rows
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    # Query head j*g + r reads KV head j (repeat_interleave): split Hq into (Hkv, g).
    q_grouped = q.reshape(num_tokens, num_kv_heads, group, head_dim)  # [t, Hkv, g, D]

    scores = torch.einsum("qjgd,kjd->jgqk", q_grouped, k) * scale  # [Hkv, g, tq, t]
    rows = torch.arange(row_start, row_start + num_tokens, device=q.device)[:, None]  # [tq, 1]
    allowed = (lo[None, :] <= rows) & (rows < hi[None, :])  # [tq, t]
    scores = scores.masked_fill(~allowed, -math.inf)

    # Shifting by the row max changes nothing mathematically, so it carries no gradient.
    # Rows that see no key have max -inf; shift them by 0 so they give exp(-inf) = 0.
    row_max = scores.detach().amax(dim=-1, keepdim=True)  # [Hkv, g, tq, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalized = torch.exp(scores - row_max)  # [Hkv, g, tq, t]
    denominator = unnormalized.sum(dim=-1, keepdim=True)  # [Hkv, g, tq, 1]
    probs = unnormalized / denominator.clamp_min(torch.finfo(scores.dtype).tiny)

    out = torch.einsum("jgqk,kjd->qjgd", probs, v)  # [tq, Hkv, g, D]
    lse = (row_max + torch.log(denominator)).squeeze(-1)  # [Hkv, g, tq]
    return (
        out.reshape(num_tokens, num_q_heads, head_dim),
        lse.permute(2, 0, 1).reshape(num_tokens, num_q_heads),
    )


def _reference_attention(
    q: Tensor, k: Tensor, v: Tensor, plan: ReferencePlan, scale: float
) -> tuple[Tensor, Tensor]:
    """Group-by-group attention; returns ``out`` [Tq, Hq, D] (q's dtype), ``lse`` [Tq, Hq]."""
    check_qkv(q, k, v, plan.num_tokens, plan.num_queries)
    working_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lo, hi = plan.lo.to(q.device), plan.hi.to(q.device)
    if plan.num_queries == 0:
        return q.new_zeros(q.shape), torch.zeros(q.shape[:2], dtype=working_dtype, device=q.device)

    # split (not slicing) so autograd gathers the gradients of all groups with one cat.
    sizes = list(plan.group_sizes)
    outs: list[Tensor] = []
    lses: list[Tensor] = []
    key_start = 0
    for q_g, k_g, v_g, lo_g, hi_g in zip(
        q.to(working_dtype).split(list(plan.query_sizes)),
        k.to(working_dtype).split(sizes),
        v.to(working_dtype).split(sizes),
        lo.split(sizes),
        hi.split(sizes),
    ):
        if q_g.shape[0] > 0:  # its first query row is the later of the group and query starts
            row_start = max(key_start, plan.q_offset)
            out_g, lse_g = _group_attention(q_g, k_g, v_g, lo_g, hi_g, row_start, scale)
            outs.append(out_g)
            lses.append(lse_g)
        key_start += k_g.shape[0]
    return torch.cat(outs).to(q.dtype), torch.cat(lses)


class ReferenceAttention(AttentionBackend):
    """Exact attention through PyTorch autograd, one group of independent ranges at a time."""

    name = "reference"

    def __init__(self, max_group_tokens: int = DEFAULT_MAX_GROUP_TOKENS) -> None:
        """``max_group_tokens`` caps the merging of small independent ranges (module docstring)."""
        if max_group_tokens < 1:
            raise ValueError(f"max_group_tokens must be >= 1, got {max_group_tokens}")
        self.max_group_tokens = max_group_tokens

    def prepare(
        self, lo: Tensor, hi: Tensor, q_offset: int = 0, num_queries: int | None = None
    ) -> ReferencePlan:
        """Validate lo/hi and the query rows, and find the token groups (reads lo/hi on the
        host once)."""
        return plan_reference_attention(lo, hi, self.max_group_tokens, q_offset, num_queries)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, prepared: ReferencePlan, scale: float
    ) -> Tensor:
        """[Tq, Hq, D] masked attention in q's dtype; see ``AttentionBackend.forward``."""
        return _reference_attention(q, k, v, prepared, scale)[0]


def reference_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lo: Tensor,
    hi: Tensor,
    scale: float | None = None,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """The reference output and its log-sum-exp: the oracle of kernel tests.

    Args:
        q: [Tq, Hq, D], the rows ``q_offset .. q_offset + Tq - 1`` of the keys;
            k, v: [T, Hkv, D]; lo, hi: int32 [T].
        scale: defaults to 1 / sqrt(D).

    Returns:
        ``out`` [Tq, Hq, D] in q's dtype and ``lse`` [Tq, Hq] in float32 (float64 for float64
        inputs): the natural log of sum_k exp(scale * q . k) over allowed keys, ``-inf`` for
        a row that sees no key.
    """
    plan = plan_reference_attention(lo, hi, q_offset=q_offset, num_queries=q.shape[0])
    return _reference_attention(
        q, k, v, plan, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    )
