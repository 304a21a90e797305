"""EMA weights (``training.ema_decay``): the average itself, its partitioning, and exact resume.

- One process (fp32, no ZeRO): after three optimizer steps the EMA equals
  ``ema = d * ema + (1 - d) * w`` computed by hand in float64 from the weights after each step.
- Two gloo ranks, ZeRO 1 and ZeRO 3: each rank holds only its partition of the average
  (about half the elements), and the partitions joined by ``assemble_ema`` equal the same
  hand-computed average of the full weights.
- ``train`` for 4 steps straight and for 2 steps then resumed to 4 leave bit-identical EMAs
  in their last checkpoints.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.ema import assemble_ema
from tests.distributed.helpers import run_distributed

DECAY = 0.8
STEPS = 3


def _configure(cfg: ModusConfig) -> ModusConfig:
    cfg = copy.deepcopy(cfg)
    cfg.training.ema_decay = DECAY
    cfg.training.optim.warmup_steps = 0
    cfg.training.optim.schedule = "constant"  # so a 2-step run is the first half of a 4-step one
    cfg.training.optim.lr = 1e-2  # large steps, so the average differs visibly from the last weights
    cfg.data.token_budget = 256
    cfg.model.zero_init_llm2vae = False
    return cfg


def _full_weights(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (gathered under ZeRO-3), in float64."""
    params = [(n, p) for n, p in engine.model.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().double().clone() for n, p in params}
    return {n: p.detach().double().clone() for n, p in params}


def _train_and_track(cfg: ModusConfig, ctx: ParallelContext) -> tuple[dict[str, torch.Tensor], object]:
    """Run STEPS optimizer steps; return the hand-computed EMA of the full weights and the engine."""
    from modus_mega.training.engine import build_engine
    from tests.model.helpers import step_inputs

    engine = build_engine(cfg, ctx)
    zero = cfg.parallel.zero_stage
    reference = _full_weights(engine, zero)
    for step in range(STEPS):
        inputs = step_inputs(copy.deepcopy(cfg), engine.model.vocab, num_samples=2, seed=10 * step + ctx.dp_rank)
        num_ce, num_mse = ctx.all_reduce_dp([*inputs.targets.counts])
        engine.train_step([inputs], (int(num_ce), int(num_mse)))
        assert engine.last_health.ok
        weights = _full_weights(engine, zero)
        reference = {n: DECAY * reference[n] + (1 - DECAY) * weights[n] for n in reference}
    return reference, engine


def _max_rel_error(ema: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert ema.keys() == reference.keys()
    return max(float((ema[n].double() - r).abs().max() / r.abs().max().clamp_min(1e-12)) for n, r in reference.items())


def test_ema_matches_hand_computed_average(tiny_config: ModusConfig) -> None:
    cfg = _configure(tiny_config)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        reference, engine = _train_and_track(cfg, ctx)
        ema = assemble_ema([engine.ema.state_dict()])
        assert _max_rel_error(ema, reference) < 1e-6
        last = {n: p.detach() for n, p in engine.model.named_parameters() if p.requires_grad}
        assert max(float((ema[n] - last[n]).abs().max()) for n in ema) > 1e-4, "the EMA must lag the weights"
    finally:
        ctx.close()


def _zero_worker(raw: dict, out: str) -> None:
    from megatron.core import parallel_state

    results = {}
    for stage in (1, 3):
        cfg = config_from_dict(copy.deepcopy(raw))
        cfg.parallel.zero_stage = stage
        ctx = ParallelContext.initialize(cfg.parallel)
        try:
            reference, engine = _train_and_track(cfg, ctx)
            states: list = [None] * ctx.world_size
            torch.distributed.all_gather_object(states, engine.ema.state_dict())
            held = sum(t.numel() for t in engine.ema.shadow.values())
            results[f"zero{stage}"] = {
                "error": _max_rel_error(assemble_ema(states), reference),
                "held_share": held / sum(t.numel() for t in reference.values()),
            }
        finally:
            parallel_state.destroy_model_parallel()
    (Path(out) / f"rank{ctx.rank}.json").write_text(json.dumps(results))
    ctx.close()


def test_ema_is_partitioned_like_the_master_weights_under_zero(tmp_path: Path) -> None:
    from tests.conftest import _TINY

    run_distributed(_zero_worker, 2, config_to_dict(_configure(_TINY)), str(tmp_path))
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stage, result in results.items():
            assert result["error"] < 1e-6, (rank, stage, result)
            assert 0.4 < result["held_share"] < 0.6, (rank, stage, result)  # half of the elements, give or take padding


def _final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / tag / "extras" / "rank_00000.pt", weights_only=True)["ema"]["tensors"]


def test_resume_keeps_the_ema_identical(tiny_config: ModusConfig, tmp_path: Path) -> None:
    from modus_mega.training.loop import train

    def run(run_dir: Path, steps: int) -> None:
        cfg = _configure(tiny_config)
        cfg.training.steps, cfg.training.run_dir, cfg.training.wandb_mode = steps, str(run_dir), "disabled"
        ctx = ParallelContext.initialize(cfg.parallel)
        try:
            train(cfg, ctx)
        finally:
            ctx.close()

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    halfway = _final_ema(tmp_path / "resumed")
    run(tmp_path / "resumed", 4)
    straight, resumed = _final_ema(tmp_path / "straight"), _final_ema(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert any(not torch.equal(halfway[n], resumed[n]) for n in halfway), "the resumed run must keep averaging"
