"""Human-readable output of a plan: the workload, the ranked table, the rejections."""

from __future__ import annotations

from collections import Counter

from modus_mega.plan.memory import GIB
from modus_mega.plan.search import Candidate, Plan
from modus_mega.plan.workload import micro_batch


def workload_summary(plan: Plan) -> str:
    """What a micro-batch holds under the plan's assumptions (a few lines)."""
    mix, options = plan.mix, plan.options
    budget = (plan.best() or plan.candidates[0]).layout.token_budget
    mb = micro_batch(mix, max(budget, mix.max_tokens), options.packing_efficiency)
    dense_pairs = mb.tokens * (mb.tokens + 1) / 2
    return "\n".join(
        [
            f"documents: mean {mix.mean_tokens:,.0f} tokens, longest {mix.max_tokens:,} "
            f"(VAE split {mix.vae_tokens_per_image} tokens, ViT split {mix.vit_tokens_per_image}, 1D segment {mix.tokens_1d} assumed)",
            f"micro-batch of {mb.tokens:,}: {mb.documents:.1f} documents, packing {mb.packing_efficiency:.0%}, "
            f"ViT {mb.vit_tokens / mb.tokens:.0%} of tokens, CE targets {mb.ce_tokens / mb.tokens:.1%}, "
            f"{mb.vae_images:.1f} VAE images; attention pairs {mb.attention_pairs / dense_pairs:.1%} of a causal T^2/2",
        ]
    )


_HEADER = (
    f"{'#':>3} {'tp':>2} {'pp':>2} {'dp':>4} {'zero':>4} {'sp':>2} {'recompute':>9} {'budget':>6} {'ga':>3} "
    f"{'batch Mi':>8} {'mem GiB':>7} {'step s':>7} {'tok/s/GPU':>9} {'MFU':>5} {'bubble':>6} {'comm':>5}"
)


def candidate_row(rank: int, candidate: Candidate, peak_tflops: float) -> str:
    """One table row of a layout that fits."""
    layout, memory, step = candidate.layout, candidate.memory, candidate.step
    assert memory is not None and step is not None
    comm = step.tp_comm_s + step.pp_p2p_s + step.dp_comm_s
    return (
        f"{rank:>3} {layout.tp:>2} {layout.pp:>2} {layout.dp:>4} {layout.zero_stage:>4} "
        f"{'y' if layout.sequence_parallel else '-':>2} {layout.recompute:>9} {layout.token_budget:>6} "
        f"{layout.grad_accum:>3} {layout.global_batch_tokens / 2**20:>8.2f} {memory.peak / GIB:>7.1f} "
        f"{step.total_s:>7.2f} {step.tokens_per_s_per_gpu(layout.gpus):>9,.0f} "
        f"{step.mfu(layout.gpus, peak_tflops):>5.1%} {step.pp_bubble_s / step.total_s:>6.1%} "
        f"{comm / step.total_s:>5.1%}"
    )


def ranked_table(plan: Plan, top: int) -> str:
    """The ``top`` fastest layouts that fit."""
    rows = [_HEADER]
    for rank, candidate in enumerate(plan.ranked[:top], start=1):
        rows.append(candidate_row(rank, candidate, plan.calibration.peak_tflops))
    if not plan.ranked:
        rows.append("    no layout fits; see the rejections below")
    return "\n".join(rows)


def rejection_summary(plan: Plan, show_all: bool) -> str:
    """Rejected layouts counted by reason kind, with one example each (or every one)."""
    rejected = plan.rejected
    if not rejected:
        return "rejected: none"
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    lines = [f"rejected: {len(rejected)} layouts"]
    for candidate in rejected:
        for reason in candidate.reasons:
            kind = reason.split(":", 1)[0]
            kinds[kind] += 1
            examples.setdefault(kind, f"{candidate.layout.describe()}: {reason}")
        if show_all:
            lines.append(f"  {candidate.layout.describe():<40} " + " | ".join(candidate.reasons))
    if not show_all:
        for kind, count in kinds.most_common():
            lines.append(f"  {count:>4} x {kind:<7} e.g. {examples[kind]}")
    return "\n".join(lines)


def best_breakdown(candidate: Candidate) -> str:
    """Memory and time terms of one layout."""
    memory, step = candidate.memory, candidate.step
    assert memory is not None and step is not None
    s = memory.states
    return "\n".join(
        [
            f"layout: {candidate.layout.describe()}",
            f"  memory GiB (stage {memory.stage}): weights {s.weights / GIB:.1f}, grads {s.gradients / GIB:.1f}, "
            f"master {s.master_weights / GIB:.1f}, Adam {s.optimizer_states / GIB:.1f}, EMA {s.ema / GIB:.1f}, "
            f"buffers {memory.buffers / GIB:.1f}, activations {memory.activations / GIB:.1f}, "
            f"working {memory.working / GIB:.1f}, VAE encode {memory.encode / GIB:.1f}, step {memory.step / GIB:.1f}, "
            f"fragmentation {memory.fragmentation / GIB:.1f} -> peak {memory.peak / GIB:.1f}",
            f"  step s: compute {step.compute_s:.2f}, TP {step.tp_comm_s:.2f}, PP bubble {step.pp_bubble_s:.2f}, "
            f"PP p2p {step.pp_p2p_s:.2f}, DP exposed {step.dp_comm_s:.2f}, optimizer {step.optimizer_s:.3f} "
            f"-> {step.total_s:.2f}",
        ]
    )
