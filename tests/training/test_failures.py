"""Non-finite steps are skipped, counted, agreed on by every rank, and stop the run when they persist.

Faults are injected from the tests only: a NaN factor on one micro-batch's loss, a
forward hook whose backward turns the gradient into NaN (finite loss, non-finite
gradient), or a patched ``modus_loss`` in the training step.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.failures import BadStepCounter, NonFiniteTrainingError, SkippableAdamW, StepHealth
from tests.distributed.helpers import run_distributed


def _configure(cfg: ModusConfig) -> ModusConfig:
    cfg = copy.deepcopy(cfg)
    cfg.training.ema_decay = 0.5
    cfg.training.optim.warmup_steps = 0
    cfg.data.token_budget = 256
    cfg.model.zero_init_llm2vae = False
    cfg.training.wandb_mode = "disabled"
    return cfg


def _snapshot(engine) -> dict[str, torch.Tensor]:
    """Weights, Adam moments and EMA, cloned."""
    out = {f"param/{n}": p.detach().clone() for n, p in engine.model.named_parameters()}
    for i, state in enumerate(engine.optimizer.state.values()):
        out |= {f"adam/{i}/{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    out |= {f"ema/{n}": t.clone() for n, t in engine.ema.shadow.items()}
    return out


def _step(engine, cfg: ModusConfig, ctx: ParallelContext, seed: int, loss_factor: float = 1.0) -> StepHealth:
    """One optimizer step on a fresh micro-batch; the loss is multiplied by ``loss_factor``."""
    import modus_mega.training.step as step_module
    from tests.model.helpers import step_inputs

    def scaled_loss(*args, **kwargs):
        terms = original(*args, **kwargs)
        return dataclasses.replace(terms, loss=terms.loss * loss_factor)

    original = step_module.modus_loss
    inputs = step_inputs(copy.deepcopy(cfg), engine.model.vocab, num_samples=2, seed=seed)
    num_ce, num_mse = ctx.all_reduce_dp([*inputs.targets.counts])
    with mock.patch.object(step_module, "modus_loss", scaled_loss):
        engine.train_step([inputs], (int(num_ce), int(num_mse)))
    return engine.last_health


def _assert_same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a skipped step changed {changed[:5]}"


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def test_nonfinite_loss_and_gradient_skip_the_update(tiny_config: ModusConfig) -> None:
    from modus_mega.training.engine import build_engine

    cfg = _configure(tiny_config)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        engine = build_engine(cfg, ctx)
        assert _step(engine, cfg, ctx, seed=0).ok
        before = _snapshot(engine)

        health = _step(engine, cfg, ctx, seed=1, loss_factor=float("nan"))
        assert health == StepHealth(nonfinite_loss_ranks=(0,), nonfinite_grad_ranks=(0,))
        _assert_same(before, _snapshot(engine))

        handle = engine.model.layers[0].register_forward_hook(lambda module, args, out: _NaNGradient.apply(out))
        health = _step(engine, cfg, ctx, seed=2)
        handle.remove()
        assert health == StepHealth(nonfinite_grad_ranks=(0,)), health
        _assert_same(before, _snapshot(engine))

        assert _step(engine, cfg, ctx, seed=3).ok  # the next clean step updates again
        after = _snapshot(engine)
        assert not torch.equal(before["param/embed_tokens.weight"], after["param/embed_tokens.weight"])
        assert all(torch.isfinite(t).all() for t in after.values())
    finally:
        ctx.close()


def _any_rank_worker(raw: dict, out: str) -> None:
    from modus_mega.training.engine import build_engine

    cfg = config_from_dict(raw)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        engine = build_engine(cfg, ctx)
        _step(engine, cfg, ctx, seed=ctx.rank)
        before = _snapshot(engine)
        health = _step(engine, cfg, ctx, seed=10 + ctx.rank, loss_factor=float("nan") if ctx.rank == 1 else 1.0)
        unchanged = all(torch.equal(v, _snapshot(engine)[k]) for k, v in before.items())
        result = {"health": dataclasses.asdict(health), "unchanged": unchanged}
        (Path(out) / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    finally:
        ctx.close()


def test_every_rank_skips_when_one_rank_sees_nan(tmp_path: Path) -> None:
    """dp = 2 without ZeRO, where only our gate stands between a NaN and the weights."""
    from tests.conftest import _TINY

    run_distributed(_any_rank_worker, 2, config_to_dict(_configure(_TINY)), str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["health"] == {"nonfinite_loss_ranks": [1], "nonfinite_grad_ranks": [1]}, (rank, result)
        assert result["unchanged"], rank


def test_pre_step_hooks_run_once_per_step_even_after_a_plain_adamw_exists() -> None:
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # makes torch wrap AdamW.step with its hook runner too
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = SkippableAdamW([param], lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append(1))
    param.grad = torch.ones(2)
    optimizer.step()
    assert len(calls) == 1 and not torch.equal(param.detach(), torch.ones(2))
    optimizer.skip_next_step = True
    before = param.detach().clone()
    optimizer.step()
    assert len(calls) == 2 and torch.equal(param.detach(), before)


def test_counter_resets_on_a_good_step_and_stops_at_the_limit() -> None:
    bad, good = StepHealth(nonfinite_loss_ranks=(3,)), StepHealth()
    counter = BadStepCounter(max_bad_steps=2)
    for step, health in enumerate([bad, good, bad]):
        counter.record(health)
        counter.check(step, health)
    counter.record(bad)
    with pytest.raises(NonFiniteTrainingError, match=r"step 3: non-finite loss on ranks \[3\]\. Steps 2\.\.3"):
        counter.check(3, bad)
    assert (counter.skipped_steps, counter.bad_in_a_row) == (3, 2)


def test_train_logs_skipped_steps_and_aborts(tiny_config: ModusConfig, tmp_path: Path, monkeypatch) -> None:
    import modus_mega.training.loop as loop
    import modus_mega.training.step as step_module

    bad_steps = {1, 3, 4}
    calls = []
    original = step_module.modus_loss

    def faulty_loss(*args, **kwargs):
        terms = original(*args, **kwargs)
        step = len(calls)  # one micro-batch per step
        calls.append(step)
        return dataclasses.replace(terms, loss=terms.loss * float("nan")) if step in bad_steps else terms

    monkeypatch.setattr(step_module, "modus_loss", faulty_loss)
    cfg = _configure(tiny_config)
    cfg.training.steps, cfg.training.log_every, cfg.training.max_bad_steps = 8, 1, 2
    cfg.training.run_dir = str(tmp_path)
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        with pytest.raises(NonFiniteTrainingError, match=r"step 4: non-finite loss on ranks \[0\].*Steps 3\.\.4"):
            loop.train(cfg, ctx)
    finally:
        ctx.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3]
