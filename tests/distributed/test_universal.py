"""Universal checkpoints: a run saved at one layout continues at another (``convert/universal.py``).

One spawn of two gloo ranks trains the tiny model (EMA on, both 1D and 2D targets) for
four steps, checkpointing after step two, at two layouts:

- tp = 2 (the issue's test): its step-2 tag, converted to universal, resumes at tp = 1 x
  pp = 2; both at ZeRO 0, where torch's own per-parameter AdamW state is read and set;
- dp = 2, ZeRO 1: its step-2 tag resumes at dp = 2, ZeRO 2: flat partitions over dp are
  read and written (DeepSpeed's fragments, some parameters cut by the partition border).

Each resumed run must log the uninterrupted run's losses for steps 2 and 3. Step 2's
loss depends on the restored weights and data position only; step 3's also on the Adam
moments and step count (bias correction): loading zero moments, or step 0, fails it.
The layouts sum in different orders (tp splits matmuls and all-reduces partial sums, pp
does neither; the ZeRO stages reduce gradients in other buckets), so the losses agree to
fp32 rounding accumulated over a forward pass and one update, not bit for bit: rel 1e-5,
the tolerance ``test_layouts.py`` uses between ZeRO stages (observed: about 1e-7).

Right after loading, before any step, every rank's weights, Adam moments and EMA pieces
must equal its slice of the universal tensors exactly. Refusal: another layout without
the universal form names the conversion command.

Another dp: the dp = 2 tag resumes in one process (dp = 1). Its weights, moments and EMA
must be the universal tensors exactly, the data position is resharded from both saved
ranks' loader states (``data/reshard.py``; logged), and it trains a step. Its losses are
not the uninterrupted run's: the global batch is another (``tests/data/test_reshard.py``
checks that no sample is lost or repeated).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state

from modus_mega.checkpoint_layout import UNIVERSAL_DIR, extras_file, run_checkpoints
from modus_mega.config import ModusConfig, config_to_dict
from modus_mega.convert.__main__ import main
from modus_mega.convert.deepspeed_run import ADAM_STATES
from modus_mega.convert.universal import EMA_DIR, FP32, read_tensor, write_universal
from modus_mega.data.loader import PackedLoader
from modus_mega.parallel.context import ParallelContext
from modus_mega.parallel.pipeline import global_parameter_name
from modus_mega.parallel.tensor_parallel import init_hooks
from modus_mega.training.checkpoint import load_checkpoint
from modus_mega.training.engine import TrainEngine, build_engine
from modus_mega.training.loop import train
from tests.distributed.helpers import run_distributed, run_in_layout

STEPS = 4
SAVED_AT = 2
TAG = f"step_{SAVED_AT:08d}"
TP2 = {"parallel.tp": 2}
PP2 = {"parallel.pp": 2}
DP2_ZERO1 = {"parallel.zero_stage": 1}
DP2_ZERO2 = {"parallel.zero_stage": 2}
# resumed run -> (uninterrupted run, its layout, the resumed layout)
RESUMES = {"tp2_as_pp2": ("tp2", TP2, PP2), "dp2_zero1_as_zero2": ("dp2_zero1", DP2_ZERO1, DP2_ZERO2)}
DP1 = "dp2_as_dp1"  # the dp2_zero1 tag resumed by one process, for one step
RESHARD_LOG = "dp2_as_dp1.log"  # what modus_mega.training.checkpoint logged there


def _copy_tag(source: Path, run_dir: Path, universal: bool) -> None:
    """A fresh run directory whose ``latest`` is ``source``'s step-2 tag (its universal form too, if asked)."""
    ignore = None if universal else shutil.ignore_patterns(UNIVERSAL_DIR)
    shutil.copytree(run_checkpoints(source) / TAG, run_checkpoints(run_dir) / TAG, ignore=ignore)
    (run_checkpoints(run_dir) / "latest").write_text(TAG)


def _continue_from(source: Path, run_dir: Path, universal: bool) -> None:
    """``_copy_tag`` by rank 0, seen by all."""
    if dist.get_rank() == 0:
        _copy_tag(source, run_dir, universal)
    dist.barrier()


def _restored_mismatches(engine: TrainEngine, folder: Path, ctx: ParallelContext) -> list[str]:
    """What differs between this rank's loaded state and its slice of the universal tensors (collective over dp)."""
    shard = init_hooks(ctx)["shard"]
    rename = global_parameter_name if ctx.pp > 1 else str
    params = dict(engine.model.named_parameters())
    bad = []
    for local_name, param in params.items():
        name = rename(local_name)
        if not torch.equal(param.detach(), shard(param, read_tensor(folder, name, FP32))):
            bad.append(f"{name} weight")
        if not param.requires_grad:
            continue
        for key in ADAM_STATES:
            restored = safe_get_full_optimizer_state(param, key)  # ZeRO: joined over dp
            if restored is None:  # ZeRO 0: the parameter's own torch state
                restored = engine.optimizer.state[param][key]
            if not torch.equal(restored, shard(param, read_tensor(folder, name, key))):
                bad.append(f"{name} {key}")
    state = engine.ema.state_dict()
    for local_name, piece in state["tensors"].items():
        full = shard(params[local_name], read_tensor(folder, rename(local_name), EMA_DIR)).reshape(-1)
        start = state["starts"][local_name]
        if not torch.equal(piece, full[start : start + piece.numel()]):
            bad.append(f"{rename(local_name)} ema")
    steps = {int(s["step"]) for s in engine.optimizer.state.values()}
    if steps != {SAVED_AT}:
        bad.append(f"optimizer steps {steps}")
    return bad


def _check_restore(run_dir: Path, out: Path):
    def action(cfg: ModusConfig, ctx: ParallelContext) -> None:
        engine = build_engine(cfg, ctx)
        loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, engine.model.vocab, ctx.dp_rank, ctx.dp)
        state = load_checkpoint(engine, loader, ctx, run_checkpoints(run_dir))
        bad = _restored_mismatches(engine, run_checkpoints(run_dir) / TAG / UNIVERSAL_DIR, ctx)
        (out / f"restore_{run_dir.name}_rank{ctx.rank}.json").write_text(json.dumps({"step": state.step, "bad": bad}))

    return action


def _expect_refusal(out: Path, name: str):
    def action(cfg: ModusConfig, ctx: ParallelContext) -> None:
        engine = build_engine(cfg, ctx)
        loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, engine.model.vocab, ctx.dp_rank, ctx.dp)
        try:
            load_checkpoint(engine, loader, ctx, run_checkpoints(cfg.training.run_dir))
            message = "loaded without error"
        except ValueError as e:
            message = str(e)
        if ctx.is_main:
            (out / f"refusal_{name}.txt").write_text(message)

    return action


def _worker(raw: dict, out_dir: str) -> None:
    out = Path(out_dir)
    for name, layout in (("tp2", TP2), ("dp2_zero1", DP2_ZERO1)):
        run_in_layout(raw, layout, out / name, lambda cfg, ctx: train(cfg, ctx))
    if dist.get_rank() == 0:
        write_universal(run_checkpoints(out / "tp2") / TAG)
        main(["universal", str(run_checkpoints(out / "dp2_zero1") / TAG), "--quiet"])  # the command line's way
    dist.barrier()
    for resumed, (source, _, layout) in RESUMES.items():
        _continue_from(out / source, out / resumed, universal=True)
        run_in_layout(raw, layout, out / resumed, _check_restore(out / resumed, out))
        run_in_layout(raw, layout, out / resumed, lambda cfg, ctx: train(cfg, ctx))

    _continue_from(out / "tp2", out / "no_universal", universal=False)
    run_in_layout(raw, PP2, out / "no_universal", _expect_refusal(out, "no_universal"))
    dist.destroy_process_group()


def _one_rank_worker(raw: dict, out_dir: str) -> None:
    out = Path(out_dir)
    logging.getLogger("modus_mega.training.checkpoint").addHandler(logging.FileHandler(out / RESHARD_LOG))
    layout = {**DP2_ZERO1, "training.steps": SAVED_AT + 1}
    run_in_layout(raw, layout, out / DP1, _check_restore(out / DP1, out))
    run_in_layout(raw, layout, out / DP1, lambda cfg, ctx: train(cfg, ctx))
    dist.destroy_process_group()


def _raw_config() -> dict:
    from tests.conftest import _TINY

    cfg = copy.deepcopy(_TINY)
    cfg.training.steps = STEPS
    cfg.training.checkpoint_every = SAVED_AT
    cfg.training.log_every = 1
    cfg.training.optim.warmup_steps = 0
    cfg.training.ema_decay = 0.9
    cfg.data.token_budget = 256
    cfg.model.zero_init_llm2vae = False  # a zero head would hide the 2D gradient path behind it
    cfg.training.wandb_mode = "disabled"
    return config_to_dict(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("universal")
    run_distributed(_worker, 2, _raw_config(), str(out))
    return out


@pytest.fixture(scope="module")
def one_rank_run(runs: Path) -> Path:
    _copy_tag(runs / "dp2_zero1", runs / DP1, universal=True)
    run_distributed(_one_rank_worker, 1, _raw_config(), str(runs))
    return runs


def _records(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("resumed", list(RESUMES))
def test_resumed_run_continues_the_uninterrupted_losses(runs: Path, resumed: str) -> None:
    straight, continued = _records(runs, RESUMES[resumed][0]), _records(runs, resumed)
    assert [r["step"] for r in straight] == list(range(STEPS))
    assert [r["step"] for r in continued] == list(range(SAVED_AT, STEPS))
    assert any(r["ce"] > 0 for r in continued) and any(r["mse"] > 0 for r in continued)  # both heads ran
    for key in ("loss", "ce", "mse"):
        expected = [r[key] for r in straight[SAVED_AT:]]
        assert [r[key] for r in continued] == pytest.approx(expected, rel=1e-5), key


@pytest.mark.parametrize("resumed", list(RESUMES))
def test_restored_state_is_the_universal_tensors_exactly(runs: Path, resumed: str) -> None:
    for rank in range(2):
        result = json.loads((runs / f"restore_{resumed}_rank{rank}.json").read_text())
        assert result["step"] == SAVED_AT
        assert result["bad"] == [], (rank, result["bad"][:5])


def test_universal_form_holds_every_parameter_in_full(runs: Path) -> None:
    folder = run_checkpoints(runs / "tp2") / TAG / UNIVERSAL_DIR
    manifest = json.loads((folder / "universal.json").read_text())
    assert manifest["source_layout"] == {"tp": 2, "pp": 1, "dp": 1, "zero_stage": 0}
    assert (manifest["step"], manifest["optimizer_step"], manifest["ema_decay"]) == (SAVED_AT, SAVED_AT, 0.9)
    tensors = manifest["tensors"]
    assert tensors["lm_head.weight"]["shape"][0] == 832 and tensors["lm_head.weight"]["trained"]
    assert not tensors["latent_pos_embed.pos_embed"]["trained"]  # a frozen sin-cos table: weight only
    assert not (folder / "zero" / "latent_pos_embed.pos_embed" / "exp_avg.pt").exists()
    for name, entry in tensors.items():
        assert list(read_tensor(folder, name, FP32).shape) == entry["shape"], name


def test_other_layout_without_universal_names_the_command(runs: Path) -> None:
    message = (runs / "refusal_no_universal.txt").read_text()
    tag_dir = run_checkpoints(runs / "no_universal") / TAG
    assert "tp=2, pp=1, dp=1, ZeRO 0" in message and "tp=1, pp=2, dp=1, ZeRO 0" in message
    assert f"python -m modus_mega.convert universal {tag_dir}" in message


def test_other_data_parallel_degree_resumes_resharded(one_rank_run: Path) -> None:
    result = json.loads((one_rank_run / f"restore_{DP1}_rank0.json").read_text())
    assert result["step"] == SAVED_AT
    assert result["bad"] == [], result["bad"][:5]
    (record,) = _records(one_rank_run, DP1)
    assert record["step"] == SAVED_AT and 0 < record["loss"] < float("inf")
    log = (one_rank_run / RESHARD_LOG).read_text().splitlines()
    assert len(log) == 2 and all("resharded from dp=2 (readers: 2) to dp=1 (readers: 1)" in line for line in log)
    next_tag = run_checkpoints(one_rank_run / DP1) / f"step_{SAVED_AT + 1:08d}"
    loader = torch.load(extras_file(next_tag, 0), weights_only=True)["loader"]  # the resharded state, one step on
    assert loader["layout"]["dp_size"] == 1
    assert any(position["carried"] for position in loader["positions"]), "still reading the old layout's work"


def test_command_refuses_what_is_not_a_tag_and_an_existing_output(runs: Path, capsys) -> None:
    for argv in (["universal", str(runs)], ["universal", str(run_checkpoints(runs / "tp2") / TAG)]):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--quiet"])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "is not a checkpoint tag" in err and "already exists" in err
