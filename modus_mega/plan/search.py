"""Enumerate layouts for N GPUs, predict each one, rank those that fit, explain the rest.

Search space (every combination is predicted or rejected with its reason):

- tp: divisors of ``num_heads`` up to ``gpus_per_node`` (a tp group stays on NVLink);
  the config's own validation and the TP layers' rule (tp divides ``num_kv_heads``:
  ``parallel/tensor_parallel.py`` does not replicate KV heads) reject the rest;
- pp: divisors of ``num_layers``; dp = gpus / (tp * pp);
- ZeRO 0-3, with DeepSpeed's rule that ZeRO 2/3 need pp = 1;
- sequence parallelism (tp > 1 only) and activation recomputation none / full;
- micro-batch token budgets (the longest document rounded up to a multiple of 1024, then
  powers of two up to 65536, unless given); gradient accumulation is the integer that brings ``dp * budget * accumulation``
  closest to the target global batch, which must land within the tolerance.

Layouts that fit are ranked by real tokens per second per GPU (ties: less memory).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from modus_mega.config import ModusConfig, validate
from modus_mega.plan.calibration import Calibration
from modus_mega.plan.layout import EmaPlacement, Layout, Recompute
from modus_mega.plan.memory import GIB, MIXED_BF16, MemoryEstimate, Precision, estimate_memory
from modus_mega.plan.shapes import ModelShape, model_shape, vae_encoder_flops
from modus_mega.plan.timing import StepEstimate, estimate_step
from modus_mega.plan.workload import DocumentMix, document_mix, micro_batch

MAX_TOKEN_BUDGET = 65536  # largest power-of-two budget enumerated by default
BUDGET_STEP = 1024  # the smallest budget tried is the longest document rounded up to a multiple of this


@dataclass(frozen=True)
class PlanOptions:
    """What to plan for and which part of the space to search."""

    gpus: int  # GPUs of the job
    global_batch_tokens: int = 4 * 2**20  # target tokens per optimizer step (padding included)
    batch_tolerance: float = 0.25  # accepted relative distance of the achieved global batch from the target
    token_budgets: tuple[int, ...] = ()  # micro-batch budgets to try; () = powers of two from the longest document
    tp: tuple[int, ...] = ()  # restrict tp degrees; () = every candidate
    pp: tuple[int, ...] = ()  # restrict pp degrees; () = every candidate
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    recompute: tuple[Recompute, ...] = ("none", "full")
    tokens_1d: int = 128  # assumed mean tokens of a 1D segment (workload.py)
    packing_efficiency: float | None = None  # None: estimated from document lengths
    ema: EmaPlacement = "sharded"
    precision: Precision = MIXED_BF16


@dataclass(frozen=True)
class Candidate:
    """One layout with its prediction, or the reasons it was rejected."""

    layout: Layout
    memory: MemoryEstimate | None  # None when rejected before prediction
    step: StepEstimate | None
    reasons: tuple[str, ...]  # empty when the layout fits

    @property
    def fits(self) -> bool:
        """Whether the layout is predicted to run."""
        return not self.reasons


@dataclass(frozen=True)
class Plan:
    """The ranked outcome of a search."""

    config: ModusConfig
    options: PlanOptions
    calibration: Calibration
    shape: ModelShape
    mix: DocumentMix
    candidates: tuple[Candidate, ...]  # fitting ones first, best first; then the rejected

    @property
    def ranked(self) -> list[Candidate]:
        """Layouts that fit, best first."""
        return [c for c in self.candidates if c.fits]

    @property
    def rejected(self) -> list[Candidate]:
        """Layouts that do not fit, with their reasons."""
        return [c for c in self.candidates if not c.fits]

    def best(self) -> Candidate | None:
        """The fastest layout that fits (None when nothing fits)."""
        return next(iter(self.ranked), None)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _with_parallel(cfg: ModusConfig, layout: Layout) -> ModusConfig:
    """A copy of ``cfg`` with the layout's ``parallel`` fields (not validated)."""
    out = copy.deepcopy(cfg)
    par = out.parallel
    par.tp, par.pp, par.zero_stage = layout.tp, layout.pp, layout.zero_stage
    par.sequence_parallel, par.recompute = layout.sequence_parallel, layout.recompute
    par.recompute_layers = 0  # the planner models recomputing every decoder layer or none
    return out


def layout_config(cfg: ModusConfig, layout: Layout) -> ModusConfig:
    """``cfg`` with the layout's fields set, validated: what ``--out`` writes for the launcher.

    Sets ``parallel.tp / pp / zero_stage / sequence_parallel / recompute`` (and
    ``recompute_layers`` to 0: all), ``data.token_budget`` and ``training.grad_accum_steps``.
    Raises ``ValueError`` for a layout validation rejects.
    """
    out = _with_parallel(cfg, layout)
    out.data.token_budget = layout.token_budget
    out.training.grad_accum_steps = layout.grad_accum
    validate(out, source="planned layout")
    return out


def _tokens(count: int) -> str:
    """A token count for messages: ``4.0 Mi`` from 2^20 on, else digits."""
    return f"{count / 2**20:.1f} Mi" if count >= 2**20 else f"{count:,}"


def _structural_reasons(cfg: ModusConfig, layout: Layout, mix: DocumentMix, options: PlanOptions) -> list[str]:
    """Why ``layout`` cannot run regardless of memory (empty when it can)."""
    reasons = []
    try:
        validate(_with_parallel(cfg, layout), source="layout")
    except ValueError as e:
        reasons.append(f"config: {str(e).removeprefix('layout: ')}")
    llm = cfg.model.llm
    if llm.num_kv_heads % layout.tp and not reasons:
        reasons.append(
            f"config: tp={layout.tp} does not divide num_kv_heads={llm.num_kv_heads}; the TP layers "
            "(modus_mega/parallel/tensor_parallel.py) do not replicate KV heads"
        )
    if layout.token_budget < mix.max_tokens:
        reasons.append(
            f"budget: token budget {layout.token_budget} is below the longest document ({mix.max_tokens} tokens), "
            "which the packer would drop; use a larger budget"
        )
    target = options.global_batch_tokens
    achieved = layout.global_batch_tokens
    if abs(achieved - target) > options.batch_tolerance * target:
        smallest = layout.dp * layout.token_budget
        if smallest > target * (1 + options.batch_tolerance):
            reasons.append(
                f"batch: the smallest global batch of this layout, dp {layout.dp} x budget {layout.token_budget} = "
                f"{_tokens(smallest)} tokens, exceeds the target {_tokens(target)} by more than the tolerance; "
                "use more tp/pp, a smaller budget, or raise --global-batch-tokens"
            )
        else:
            reasons.append(
                f"batch: {layout.grad_accum} micro-batches of dp {layout.dp} x {layout.token_budget} tokens give "
                f"{_tokens(achieved)} tokens, too far from the target {_tokens(target)}"
            )
    return reasons


def _budgets(mix: DocumentMix, options: PlanOptions) -> list[int]:
    """Budgets to try: the given ones, or the longest document rounded up to BUDGET_STEP, then powers of two."""
    if options.token_budgets:
        return sorted(set(options.token_budgets))
    smallest = -(-mix.max_tokens // BUDGET_STEP) * BUDGET_STEP
    budgets = {smallest}
    power = 1024
    while power <= MAX_TOKEN_BUDGET:
        if power > smallest:
            budgets.add(power)
        power *= 2
    return sorted(budgets)


def plan(cfg: ModusConfig, options: PlanOptions, calibration: Calibration, shape: ModelShape | None = None) -> Plan:
    """Predict every layout of the search space for ``options.gpus`` GPUs and rank them."""
    if options.gpus < 1:
        raise ValueError(f"--gpus {options.gpus}: plan for at least one GPU")
    if options.global_batch_tokens < 1:
        raise ValueError("--global-batch-tokens must be positive")
    shape = shape or model_shape(cfg.model)
    mix = document_mix(cfg, options.tokens_1d)
    vae_flops = float(vae_encoder_flops(cfg.model.vae, mix.vae_pixels, mix.vae_pixels))
    llm = cfg.model.llm
    tps = options.tp or [k for k in _divisors(llm.num_heads) if k <= calibration.gpus_per_node]
    pps = options.pp or _divisors(llm.num_layers)

    candidates: list[Candidate] = []
    for tp in tps:
        for pp in pps:
            if options.gpus % (tp * pp):
                continue  # not a layout of this many GPUs
            dp = options.gpus // (tp * pp)
            for zero in options.zero_stages:
                for sp in (False, True) if tp > 1 else (False,):
                    for recompute in options.recompute:
                        for budget in _budgets(mix, options):
                            accum = max(1, round(options.global_batch_tokens / (dp * budget)))
                            layout = Layout(tp, pp, dp, zero, sp, recompute, budget, accum)
                            candidates.append(_evaluate(cfg, layout, shape, mix, vae_flops, calibration, options))
    if not candidates:
        raise ValueError(
            f"no tp x pp of tp in {list(tps)} and pp in {list(pps)} divides {options.gpus} GPUs; "
            "plan for a multiple of the tp degrees or widen --tp / --pp"
        )
    ranked = sorted(
        (c for c in candidates if c.fits),
        key=lambda c: (-c.step.tokens_per_s_per_gpu(c.layout.gpus), c.memory.peak),  # type: ignore[union-attr]
    )
    rejected = [c for c in candidates if not c.fits]
    return Plan(cfg, options, calibration, shape, mix, tuple(ranked + rejected))


def _evaluate(
    cfg: ModusConfig,
    layout: Layout,
    shape: ModelShape,
    mix: DocumentMix,
    vae_flops: float,
    calibration: Calibration,
    options: PlanOptions,
) -> Candidate:
    reasons = _structural_reasons(cfg, layout, mix, options)
    if reasons:
        return Candidate(layout, None, None, tuple(reasons))
    mb = micro_batch(mix, layout.token_budget, options.packing_efficiency)
    memory = estimate_memory(shape, layout, mb, calibration, options.precision, options.ema)
    step = estimate_step(shape, layout, mb, calibration, vae_flops, options.precision, options.ema)
    if memory.peak > calibration.usable_bytes:
        reasons.append(
            f"memory: needs {memory.peak / GIB:.1f} GiB per GPU on stage {memory.stage}, "
            f"{calibration.usable_bytes / GIB:.1f} GiB usable (largest term: {memory.largest_term()})"
        )
    return Candidate(layout, memory, step, tuple(reasons))
