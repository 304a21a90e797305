"""The single-process training loop (CPU or one GPU), plain AdamW.

A step reads top to bottom: take the step's micro-batches, count the global batch's
target tokens, forward + backward each micro-batch, clip, step, log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from modus_mega.config import ModusConfig, save_config
from modus_mega.data.loader import PackedBatchStream
from modus_mega.data.packing import PackedBatch
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.modalities import MODALITY_NAMES
from modus_mega.model.init import init_weights
from modus_mega.model.modus import ModusModel
from modus_mega.training.losses import modus_loss
from modus_mega.training.metrics import JsonlLog, plot_loss_curves, read_jsonl
from modus_mega.training.prepare import prepare_step_inputs
from modus_mega.training.schedule import learning_rate


@dataclass
class RunResult:
    """Where a run's outputs went, and its first and last logged records."""

    run_dir: Path
    metrics_path: Path
    curve_path: Path
    records: list[dict]


def build_model(cfg: ModusConfig, device: torch.device) -> tuple[ModusModel, FluxAutoEncoder]:
    """The trainable MODUS model and the frozen VAE, initialised from ``training.seed``."""
    model = ModusModel(cfg.model)
    zero_init = ("llm2vae",) if cfg.model.zero_init_llm2vae else ()
    init_weights(model, cfg.training.seed, cfg.model.llm.init_std, zero_init=zero_init)
    vae = FluxAutoEncoder(cfg.model.vae)
    init_weights(vae, cfg.training.seed, cfg.model.llm.init_std, prefix="vae.")
    vae.requires_grad_(False).eval()
    if cfg.model.llm.freeze_1d_expert:
        for layer in model.layers:
            layer.experts[0].requires_grad_(False)
    return model.to(device), vae.to(device)


def micro_batch_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one micro-batch's noise: a pure function of where it is in the run."""
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 131 + rank)


def train(cfg: ModusConfig, device: torch.device | None = None) -> RunResult:
    """Train ``cfg.training.steps`` steps; write config, metrics.jsonl and loss_curves.png."""
    device = device or torch.device("cpu")
    run_dir = Path(cfg.training.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    torch.manual_seed(cfg.training.seed)

    model, vae = build_model(cfg, device)
    optim_cfg = cfg.training.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
    )
    stream = PackedBatchStream(cfg.data, cfg.training.timesteps, cfg.model, model.vocab)
    batches: Iterator[PackedBatch] = iter(stream)
    log = JsonlLog(run_dir / "metrics.jsonl")

    progress = tqdm(range(cfg.training.steps), desc="train", unit="step")
    for step in progress:
        start = time.perf_counter()
        lr = learning_rate(step, cfg.training.steps, optim_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        micro_batches = [next(batches).to(device) for _ in range(cfg.training.grad_accum_steps)]
        steps_inputs = [
            prepare_step_inputs(
                mb, vae, cfg.model, micro_batch_generator(cfg.training.seed, step, i, 0, device)
            )
            for i, mb in enumerate(micro_batches)
        ]
        global_ce = sum(s.ce_index.numel() for s in steps_inputs)
        global_mse = sum(s.mse_index.numel() for s in steps_inputs)

        totals = {"loss": 0.0, "ce": 0.0, "mse": 0.0}
        modality_sum = torch.zeros(len(MODALITY_NAMES))
        modality_count = torch.zeros(len(MODALITY_NAMES))
        for inputs in steps_inputs:
            logits, velocity = model(inputs.model, inputs.ce_index, inputs.mse_index)
            terms = modus_loss(
                logits, inputs.ce_labels, inputs.ce_modality,
                velocity, inputs.velocity_target, inputs.mse_modality,
                global_ce, global_mse, cfg.training.ce_weight, cfg.training.mse_weight,
            )  # fmt: skip
            terms.loss.backward()
            totals["loss"] += float(terms.loss.detach())
            totals["ce"] += float(terms.ce_sum) / max(global_ce, 1)
            totals["mse"] += float(terms.mse_sum) / max(global_mse, 1)
            modality_sum += terms.modality_sum.cpu()
            modality_count += terms.modality_count.cpu()

        clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        elapsed = time.perf_counter() - start
        tokens = sum(mb.num_real_tokens for mb in micro_batches)
        record = {
            "step": step,
            **totals,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "packing_efficiency": tokens / (len(micro_batches) * cfg.data.token_budget),
            "skipped_samples": sum(stream.skipped.values()) + sum(stream.packer.dropped.values()),
        }
        for name, total, count in zip(MODALITY_NAMES, modality_sum.tolist(), modality_count.tolist()):
            if count:
                record[f"loss/{name}"] = total / count
        if step % cfg.training.log_every == 0 or step == cfg.training.steps - 1:
            log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", ce=f"{record['ce']:.3f}", mse=f"{record['mse']:.4f}")
    log.close()

    records = read_jsonl(log.path)
    curve_path = run_dir / "loss_curves.png"
    plot_loss_curves(records, curve_path)
    return RunResult(run_dir=run_dir, metrics_path=log.path, curve_path=curve_path, records=records)
