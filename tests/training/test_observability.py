"""Step metrics: the model-FLOP count of a micro-batch, the JSONL fields, and the offline wandb run.

The FLOP count is checked against an independent tally on a real packed micro-batch:
decoder linear weights counted from the built model's modules, attention pairs from the
dense mask, the ViT + connector and the VAE encoder measured with ``FlopCounterMode`` on
the real modules running this micro-batch.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modus_mega.config import ModusConfig
from modus_mega.data.documents import IGNORE_LABEL
from modus_mega.encoders.vae import FluxAutoEncoder
from modus_mega.model.modus import ModusModel
from modus_mega.ops.mask import dense_mask_from_lo_hi
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.observability import HAVE_WANDB, ModelFlops, resolve_wandb_mode
from tests.model.helpers import packed_batch


def _forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_micro_batch_flops_match_an_independent_count(tiny_config: ModusConfig) -> None:
    cfg = tiny_config
    model = ModusModel(cfg.model)
    vae = FluxAutoEncoder(cfg.model.vae)
    batch = packed_batch(copy.deepcopy(cfg), model.vocab, num_samples=4, seed=0)
    real = batch.num_real_tokens
    assert 0 < real < batch.model.input_ids.numel() and batch.vae_images.shape[0] and batch.model.vit_patches.shape[0]

    llm = cfg.model.llm
    expert = model.layers[0].experts[0]
    mlp = expert.mlp
    linears = (expert.q_proj, expert.k_proj, expert.v_proj, expert.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    active = llm.num_layers * sum(m.weight.numel() for m in linears)
    pairs = int(dense_mask_from_lo_hi(batch.model.attn_lo, batch.model.attn_hi)[:real, :real].sum())  # documents come first
    num_ce = int((batch.ce_labels != IGNORE_LABEL).sum())
    vit_forward = _forward_flops(
        lambda: model.connector(model.vit(batch.model.vit_patches, batch.model.vit_position_ids, batch.model.vit_cu_seqlens))
    )
    cell = cfg.model.vae.downsample * cfg.model.latent_patch_size
    vae_forward = sum(
        _forward_flops(lambda: vae.encoder(torch.zeros(1, 3, rows * cell, cols * cell)))
        for rows, cols in batch.vae_grid.tolist()
    )
    expected = (
        6 * active * real
        + 12 * llm.num_layers * llm.num_heads * llm.head_dim * pairs
        + 6 * llm.hidden_size * model.vocab.padded_size * num_ce
        + 3 * vit_forward
        + vae_forward
    )
    assert ModelFlops(cfg.model).micro_batch(batch) == pytest.approx(expected, rel=1e-9)


def test_wandb_mode_resolution() -> None:
    assert resolve_wandb_mode("disabled", {"WANDB_API_KEY": "k"}) == "disabled"
    assert resolve_wandb_mode("auto", {}) == "offline"
    assert resolve_wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_wandb_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    with pytest.raises(ValueError, match="WANDB_MODE='dry'"):
        resolve_wandb_mode("auto", {"WANDB_MODE": "dry"})


def _wandb_offline_works(directory: Path) -> str | None:
    """None when an offline wandb run can start here, else the reason it cannot."""
    if not HAVE_WANDB:
        return "wandb is not installed"
    import wandb

    try:
        wandb.init(project="probe", dir=str(directory), mode="offline").finish()
    except Exception as e:  # noqa: BLE001 (any failure means: no wandb in this environment)
        return f"wandb cannot start offline here: {e}"
    return None


def test_jsonl_fields_and_offline_wandb_run(tiny_config: ModusConfig, tmp_path: Path) -> None:
    reason = _wandb_offline_works(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    from modus_mega.training.loop import train

    def run(steps: int) -> list[dict]:
        cfg = copy.deepcopy(tiny_config)
        cfg.training.steps, cfg.training.log_every, cfg.training.run_dir = steps, 1, str(tmp_path / "run")
        cfg.training.wandb_mode, cfg.training.peak_tflops = "offline", 50.0
        cfg.training.optim.schedule = "constant"
        cfg.data.token_budget = 256
        ctx = ParallelContext.initialize(cfg.parallel)
        try:
            return train(cfg, ctx).records
        finally:
            ctx.close()

    records = run(2)
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    records = run(3)  # resumed: the same wandb run continues
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == run_id
    run_files = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(run_files) == 2, sorted(p.name for p in (tmp_path / "run" / "wandb").iterdir())

    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_gpu", "packing_efficiency",
                    "model_tflop", "tflops_per_gpu", "mfu", "skipped_samples", "skipped_steps"):  # fmt: skip
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 50.0)
        seconds = r["model_tflop"] / r["tflops_per_gpu"]  # one process: FLOPs / (FLOP/s per GPU) = step seconds
        assert r["packing_efficiency"] * 256 / r["tokens_per_s"] == pytest.approx(seconds)
        assert 0 < r["packing_efficiency"] <= 1 and r["skipped_steps"] == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1]) == records[-1]
