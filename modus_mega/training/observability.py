"""What a step achieved (tokens/s, model TFLOP/s per GPU, MFU, packing) and the wandb run.

**Model FLOPs of one packed micro-batch** (forward + backward of the useful work: real
tokens only, no recomputation, no padding; L decoder layers, D width, Hq query heads of
Dh, V padded vocabulary)::

    6 * N_active * T_real             decoder linears: N_active = L * one expert's q, k, v, o, gate,
                                      up, down weights (MoT: each token multiplies ONE expert)
  + 12 * L * Hq * Dh * pairs          attention: 2 * 2 * Hq * Dh per (query, key) pair forward (QK^T
                                      and AV), x3 with backward; ``pairs`` = the pairs the MODUS mask
                                      allows, sum over real keys of (hi[k] - lo[k]), not T^2
  + 6 * D * V * N_ce                  LM head, at the positions that carry a CE loss only
  + 3 * F_vit                         ViT + connector forward (patch embedding, layers with
                                      per-image attention pairs), x3 with backward
  + F_vae                             frozen VAE encoder, forward only, each image at its own size

The per-kind counts are the planner's (``plan.workload.MicroBatch`` filled with this
micro-batch's actual contents, ``plan.timing.micro_batch_flops``,
``plan.shapes.vae_encoder_flops``), so predicted and measured MFU count the same work.
Per step: model TFLOP/s per GPU = model FLOPs of every dp rank's micro-batches / step
seconds / world size; MFU = that / ``training.peak_tflops``. Tokens/s and packing
efficiency count real (non-padding) tokens over all data-parallel ranks.

**wandb** runs on rank 0 only, its files under ``training.run_dir/wandb``. The mode is
``training.wandb_mode``; ``auto`` takes ``$WANDB_MODE`` when set, else ``online`` when
``$WANDB_API_KEY`` is set, else ``offline`` (``wandb sync <run_dir>/wandb/offline-run-*``
uploads later). A resumed run continues the same wandb run (its id is kept in
``run_dir/wandb_run_id``).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from modus_mega.config import ModelConfig, ModusConfig, config_to_dict
from modus_mega.data.documents import IGNORE_LABEL
from modus_mega.data.packing import PackedBatch
from modus_mega.parallel.context import ParallelContext
from modus_mega.plan.shapes import model_shape, vae_encoder_flops
from modus_mega.plan.timing import micro_batch_flops, training_flops
from modus_mega.plan.workload import MicroBatch

HAVE_WANDB = importlib.util.find_spec("wandb") is not None  # imported only when a run uses it (slow import)

WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"


def micro_batch_contents(batch: PackedBatch, cfg: ModelConfig) -> tuple[MicroBatch, list[tuple[int, int]]]:
    """The planner's description of one actual packed micro-batch, and its VAE images' pixel sizes (h, w)."""
    inputs = batch.model
    budget = inputs.input_ids.numel()
    vit_lengths = (inputs.vit_cu_seqlens[1:] - inputs.vit_cu_seqlens[:-1]).long()  # [I_vit] patches per image
    ce_tokens = int((batch.ce_labels != IGNORE_LABEL).sum())
    cell = cfg.vae.downsample * cfg.latent_patch_size  # pixels per 2D token side
    vae_sizes = [(rows * cell, cols * cell) for rows, cols in batch.vae_grid.tolist()]
    vit_tokens, vae_images = float(inputs.vit_patches.shape[0]), float(len(vae_sizes))
    contents = MicroBatch(
        tokens=budget,
        packing_efficiency=batch.num_real_tokens / budget,
        documents=float(batch.num_documents),
        attention_pairs=float((inputs.attn_hi.long() - inputs.attn_lo.long()).sum()),  # padding rows see themselves
        vit_tokens=vit_tokens,
        vit_pairs=float((vit_lengths**2).sum()),
        vae_images=vae_images,
        ce_tokens=float(ce_tokens),
        peak_vit_tokens=vit_tokens,
        peak_vae_images=vae_images,
        peak_ce_tokens=float(ce_tokens),
        vae_pixels=max((max(size) for size in vae_sizes), default=0),
    )
    return contents, vae_sizes


class ModelFlops:
    """Model FLOPs of packed micro-batches (the formula in the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.shape = model_shape(cfg)  # parameter counts of the whole model (meta device, no memory)
        self._vae_flops: dict[tuple[int, int], int] = {}  # (h, w) -> encoder forward FLOPs of one image

    def vae_image_flops(self, height: int, width: int) -> int:
        """Forward FLOPs of the VAE encoder on one image (counted once per size)."""
        if (height, width) not in self._vae_flops:
            self._vae_flops[height, width] = vae_encoder_flops(self.cfg.vae, height, width)
        return self._vae_flops[height, width]

    def micro_batch(self, batch: PackedBatch) -> float:
        """Useful forward + backward FLOPs of one micro-batch over the whole model (not per GPU)."""
        contents, vae_sizes = micro_batch_contents(batch, self.cfg)
        vae_total = sum(self.vae_image_flops(h, w) for h, w in vae_sizes)
        mean_vae = vae_total / len(vae_sizes) if vae_sizes else 0.0
        return training_flops(micro_batch_flops(self.shape, contents, mean_vae, useful=True), self.cfg.llm.num_layers)


class ThroughputMeter:
    """Per-step throughput over all data-parallel ranks: tokens/s, packing, TFLOP/s per GPU, MFU."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, peak_tflops: float) -> None:
        self.flops = ModelFlops(cfg)
        self.ctx = ctx
        self.peak_tflops = peak_tflops  # 0: no MFU

    def measure(self, micro_batches: list[PackedBatch], seconds: float) -> dict[str, float]:
        """Metrics of one optimizer step over ``micro_batches`` (this rank's) that took ``seconds``.

        Collective over the data-parallel group: every rank calls it.
        """
        local = [
            float(sum(mb.num_real_tokens for mb in micro_batches)),
            float(sum(mb.model.input_ids.numel() for mb in micro_batches)),
            sum(self.flops.micro_batch(mb) for mb in micro_batches),
        ]
        tokens, capacity, flops = self.ctx.all_reduce_dp(local)
        tflops_per_gpu = flops / seconds / self.ctx.world_size / 1e12
        metrics = {
            "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_gpu": tokens / seconds / self.ctx.world_size,
            "packing_efficiency": tokens / capacity,
            "model_tflop": flops / 1e12,
            "tflops_per_gpu": tflops_per_gpu,
        }
        if self.peak_tflops > 0:
            metrics["mfu"] = tflops_per_gpu / self.peak_tflops
        return metrics


def resolve_wandb_mode(mode: str, environ: Mapping[str, str] = os.environ) -> str:
    """``online`` / ``offline`` / ``disabled`` for ``training.wandb_mode`` (``auto``: see the module docstring)."""
    if mode != "auto":
        return mode
    env_mode = environ.get("WANDB_MODE", "")
    if env_mode:
        if env_mode not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env_mode!r} is not one of {WANDB_MODES}; fix or unset it")
        return env_mode
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class WandbRun:
    """The rank-0 wandb run of a training run."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @classmethod
    def start(cls, cfg: ModusConfig, ctx: ParallelContext, resumed: bool) -> "WandbRun | None":
        """Start (or, for a ``resumed`` run, continue) the wandb run; None on other ranks or when disabled.

        Raises ``ValueError`` when wandb is wanted but not installed.
        """
        if not ctx.is_main:
            return None
        training = cfg.training
        mode = resolve_wandb_mode(training.wandb_mode)
        if mode == "disabled":
            return None
        if not HAVE_WANDB:
            raise ValueError(
                f"training.wandb_mode={training.wandb_mode} asks for a {mode} wandb run but wandb is not installed; "
                "pip install wandb, or set training.wandb_mode=disabled"
            )
        import wandb

        run_dir = Path(training.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        run = wandb.init(
            project=training.wandb_project,
            name=training.wandb_run_name or run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config_to_dict(cfg),
        )
        return cls(run)

    def log(self, record: dict[str, Any]) -> None:
        """Log one metrics record (its ``step`` is wandb's step)."""
        self._run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Log the picture at ``path`` under ``key`` at ``step`` (training-time samples)."""
        import wandb

        self._run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (``exit_code`` != 0 marks it failed)."""
        self._run.finish(exit_code=exit_code)

