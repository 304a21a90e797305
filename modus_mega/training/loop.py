"""The training loop: any layout (one CPU process up to tp x dp x pp ranks), through DeepSpeed.

A step reads top to bottom: take this rank's micro-batches, count the global batch's
target tokens (all-reduced over dp), run the step (``TrainEngine.train_step``: forward,
loss, backward, clipping and the optimizer step, whatever the layout), log; every
``training.eval_every`` steps and at the end, the validation loss on the held-out shards
(``training/validation.py``: its own record in the log, ``val/...``, before the checkpoint);
checkpoint every ``training.checkpoint_every`` steps, at the end, and when SIGTERM / SIGUSR1
arrives on any rank (then stop). A step whose loss or gradient is non-finite is skipped and
counted (``training/failures.py``); a rank that dies or hangs ends the job with that rank
named (``parallel/watchdog.py``).

Each data-parallel rank reads its own disjoint part of the data (``PackedLoader`` with
this rank's dp coordinates); the tp ranks of one dp group build the same micro-batches,
and so do the pp stages (``training/step.py``: the loop never asks which step it runs).

The log's ``skipped_samples`` and ``skipped/<reason>`` count the samples skipped since the
run began, summed over dp ranks (one all-reduce of a vector in ``SKIP_REASONS`` order).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from modus_mega.checkpoint_layout import checkpoint_root
from modus_mega.config import ModusConfig, save_config
from modus_mega.data.loader import PackedLoader
from modus_mega.data.packing import TOO_LONG
from modus_mega.host_memory import keep_freed_blocks_in_heap
from modus_mega.losses import NUM_LOSS_SUMS, loss_means
from modus_mega.modalities import MODALITY_NAMES
from modus_mega.modalities.faults import SkipReason
from modus_mega.model.inputs import target_counts
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.watchdog import Watchdog
from modus_mega.seeding import derive_seed
from modus_mega.training.checkpoint import PreemptionSignal, TrainerState, load_checkpoint, save_checkpoint
from modus_mega.training.engine import build_engine
from modus_mega.training.failures import BadStepCounter
from modus_mega.training.metrics import JsonlLog, is_validation_record, plot_loss_curves, read_jsonl
from modus_mega.training.observability import ThroughputMeter, WandbRun
from modus_mega.training.prepare import prepare_step_inputs
from modus_mega.training.samples import TrainingSampler
from modus_mega.training.schedule import learning_rate
from modus_mega.training.validation import Validation
from modus_mega.vocab import build_vocabulary

# Why samples are skipped: the readers' reasons (modalities/faults.py), then the packer's (data/packing.py).
SKIP_REASONS = tuple(reason.value for reason in SkipReason) + (TOO_LONG,)


@dataclass
class RunResult:
    """Where a run's outputs went, its logged records, and why it stopped."""

    run_dir: Path
    metrics_path: Path
    curve_path: Path
    records: list[dict]  # the training steps' records
    validation: list[dict]  # the validation records (``val/...``; training.eval_every)
    resumed_from: int  # optimizer step the run started at (0: fresh)
    preempted: bool  # stopped early on SIGTERM / SIGUSR1 after checkpointing


def micro_batch_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise: a pure function of its place in the run.

    ``micro`` indexes the step's global block of micro-batches (all dp ranks), so the noise
    does not depend on the layout and a resumed run draws the same noise.
    """
    return torch.Generator(device=device).manual_seed(derive_seed("micro-batch", seed, step, micro))


def train(cfg: ModusConfig, ctx: ParallelContext) -> RunResult:
    """Train until ``training.steps`` (resuming from the run's latest checkpoint if any).

    Rank 0 writes config.json, metrics.jsonl and loss_curves.png into ``training.run_dir``.
    """
    keep_freed_blocks_in_heap()  # a step's cost must not depend on the process's allocation history
    run_dir = Path(cfg.training.run_dir)
    root = checkpoint_root(cfg)
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    torch.manual_seed(cfg.training.seed)

    engine = build_engine(cfg, ctx)
    vocab = build_vocabulary(cfg.model.vocab)
    loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, vocab, ctx.dp_rank, ctx.dp)
    validation = Validation.build(cfg, ctx, vocab)  # None: training.eval_every = 0
    fallback = cfg.training.resume == "fallback"  # a damaged latest tag: resume from the newest complete one
    state = (load_checkpoint(engine, loader, ctx, root, fallback) if cfg.training.resume else None) or TrainerState(step=0)
    resumed_from = state.step
    failures = BadStepCounter(cfg.training.max_bad_steps, state.skipped_steps, state.bad_in_a_row)
    meter = ThroughputMeter(cfg.model, ctx, cfg.training.peak_tflops)
    tracker = WandbRun.start(cfg, ctx, resumed=resumed_from > 0)  # rank 0 only
    sampler = TrainingSampler(cfg, ctx)  # held-out samples every training.sample_every steps (rank 0)
    accum = cfg.training.grad_accum_steps
    batches = iter(loader)
    metrics_path = run_dir / "metrics.jsonl"
    if ctx.is_main:
        _truncate_log(metrics_path, keep_below_step=state.step)  # drop steps a killed run logged after its checkpoint
    log = JsonlLog(metrics_path) if ctx.is_main else None

    preempted = False
    progress = tqdm(range(state.step, cfg.training.steps), desc="train", unit="step", disable=not ctx.is_main)
    watchdog = Watchdog(ctx.rank, ctx.world_size, cfg.parallel.collective_timeout_s)
    with watchdog, PreemptionSignal() as preemption:
        for step in progress:
            watchdog.progress(step)
            start = time.perf_counter()
            lr = learning_rate(step, cfg.training.steps, cfg.training.optim)
            engine.set_lr(lr)

            micro_batches = [next(batches).to(ctx.device) for _ in range(accum)]
            steps_inputs = [
                prepare_step_inputs(
                    mb, engine.vae, cfg.model,
                    micro_batch_generator(cfg.training.seed, step, ctx.dp_rank * accum + i, ctx.device),
                )
                for i, mb in enumerate(micro_batches)
            ]  # fmt: skip
            global_ce, global_mse = ctx.all_reduce_dp(target_counts(steps_inputs))

            # [loss, ce_sum, mse_sum, modality sums..., modality counts...] of this rank, summed over dp below
            sums = engine.train_step(steps_inputs, (int(global_ce), int(global_mse)))
            summed = ctx.all_reduce_dp(sums.tolist() + skip_counts(loader))  # one all-reduce for both
            totals, skips = summed[:NUM_LOSS_SUMS], summed[NUM_LOSS_SUMS:]  # [NUM_LOSS_SUMS], [len(SKIP_REASONS)]
            elapsed = time.perf_counter() - start
            failures.record(engine.last_health)
            throughput = meter.measure(micro_batches, elapsed)  # collective over dp

            if log is not None:
                record = _step_record(step, totals, global_ce, global_mse, engine.grad_norm(), lr, throughput, failures, skips)
                if step % cfg.training.log_every == 0 or step == cfg.training.steps - 1:
                    log.write(record)
                    if tracker is not None:
                        tracker.log(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}", mse=f"{record['mse']:.4f}")
            failures.check(step, engine.last_health)  # raises after training.max_bad_steps non-finite steps in a row

            state = TrainerState(step=step + 1, skipped_steps=failures.skipped_steps, bad_in_a_row=failures.bad_in_a_row)
            preempted = ctx.any_rank(preemption.received is not None)
            if validation is not None and not preempted and validation.due(state.step):
                val_record = validation.evaluate(engine, state.step)  # collective over every rank
                watchdog.progress(step)  # the stall clock times the validation apart from the step
                if log is not None:
                    log.write(val_record)
                    if tracker is not None:
                        tracker.log(val_record)
            every = cfg.training.checkpoint_every
            if preempted or (every and state.step % every == 0) or state.step == cfg.training.steps:
                save_checkpoint(engine, loader, ctx, cfg, root, state)
                watchdog.progress(step)  # the stall clock times the checkpoint apart from the step
            sampler.after_step(state.step, engine, tracker)
            if preempted:
                break
    if log is not None:
        log.close()
    if tracker is not None:
        tracker.finish()

    records = read_jsonl(metrics_path) if metrics_path.is_file() else []
    curve_path = run_dir / "loss_curves.png"
    if ctx.is_main and records:
        plot_loss_curves(records, curve_path)
    validation_records = [r for r in records if is_validation_record(r)]
    step_records = [r for r in records if not is_validation_record(r)]
    return RunResult(
        run_dir, metrics_path, curve_path, step_records, validation_records, resumed_from=resumed_from, preempted=preempted
    )


def _step_record(
    step: int,
    totals: list[float],
    global_ce: float,
    global_mse: float,
    grad_norm: float,
    lr: float,
    throughput: dict[str, float],
    failures: BadStepCounter,
    skips: list[float],
) -> dict:
    """One metrics.jsonl line from the dp-summed step totals and skip counts and the step's throughput."""
    means = loss_means(totals, global_ce, global_mse)  # loss, ce, mse, loss/<modality>
    return {
        "step": step,
        **{key: means[key] for key in ("loss", "ce", "mse")},
        "grad_norm": grad_norm,
        "lr": lr,
        **throughput,
        "skipped_samples": int(sum(skips)),  # every reason, all dp ranks, since the run began
        **{f"skipped/{reason}": int(count) for reason, count in zip(SKIP_REASONS, skips)},
        "skipped_steps": failures.skipped_steps,  # non-finite loss or gradient, since the run began
        **{key: value for key, value in means.items() if key.startswith("loss/")},
    }


def skip_counts(loader: PackedLoader) -> list[float]:
    """This rank's skipped samples since the run began, by reason, in ``SKIP_REASONS`` order."""
    counts = loader.skipped + loader.packer.dropped
    unknown = sorted(counts.keys() - set(SKIP_REASONS))
    assert not unknown, f"skip reasons {unknown} are missing from SKIP_REASONS (the log would drop them)"
    return [float(counts[reason]) for reason in SKIP_REASONS]


def _truncate_log(path: Path, keep_below_step: int) -> None:
    """Keep only records of steps before ``keep_below_step`` (a resumed run logs the rest again).

    A validation record at ``keep_below_step`` itself stays: it preceded that checkpoint.
    """
    if not path.is_file():
        return
    kept = [
        r for r in read_jsonl(path)
        if r["step"] < keep_below_step or (is_validation_record(r) and r["step"] == keep_below_step)
    ]  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
