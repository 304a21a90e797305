"""BAGEL release -> training run (tp = 2, pp = 2, ZeRO 0-3) -> Hugging Face and BAGEL layouts.

A tiny bf16 BAGEL release built here initialises real training runs (``init.bagel_dir``,
two gloo ranks, ``build_engine`` / ``train``), whose DeepSpeed checkpoints are exported
through the command line. The expected tensors are the release's own, taken from the
reference model the release was written from, with MODUS's new vocabulary rows drawn by
``extend_vocab_rows`` (the documented scheme), independently of the run and of the export.

- tp = 2, zero steps: the HF export equals the release bit for bit, and the text-only
  BAGEL export in bf16 reproduces ``ema.safetensors`` byte for byte; ZeRO 3 exports the
  same, and so does pp = 2 (each stage loaded only its own tensors) at ZeRO 1.
- one training step from the release and one from its round trip through the BAGEL
  layout: the same loss and the same trained weights.
- dp = 2 after one step: ZeRO 2 and 3 export ZeRO 0's weights, and their EMA is
  ``decay * initial + (1 - decay) * trained``.
- corrupted and mismatched run directories are refused with the reason.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor

from modus_mega.checkpoint_layout import checkpoint_root, resumes_from_checkpoint
from modus_mega.config import ModusConfig, config_from_dict, config_to_dict
from modus_mega.convert.__main__ import main
from modus_mega.convert.bagel import write_bagel
from modus_mega.convert.deepspeed_run import DeepSpeedRunSource
from modus_mega.convert.hf import open_hf
from modus_mega.convert.keymap import VAE_PREFIX, VOCAB_TENSORS
from modus_mega.convert.source import extend_vocab_rows
from modus_mega.data.loader import PackedLoader
from modus_mega.parallel.context import ParallelContext
from modus_mega.training.checkpoint import TrainerState, save_checkpoint
from modus_mega.training.engine import build_engine
from modus_mega.training.loop import train
from tests.convert.helpers import TOKENIZER_FILES, random_reference, tiny_config, write_release
from tests.distributed.helpers import config_with, run_distributed, run_in_layout

EMA_DECAY = 0.75
NEW_ROWS_SEED = 3
TAG = "checkpoints/step_00000000"


def _run_layouts(
    raw: dict, out: Path, layouts: dict[str, dict], action: Callable[[ModusConfig, ParallelContext], None]
) -> None:
    for name, overrides in layouts.items():
        run_in_layout(raw, overrides, out / name, action)


def _save_untrained(cfg: ModusConfig, ctx: ParallelContext) -> None:
    """Build the engine (initialised from init.bagel_dir) and checkpoint it at step 0."""
    engine = build_engine(cfg, ctx)
    loader = PackedLoader(cfg.data, cfg.training.timesteps, cfg.model, engine.model.vocab, ctx.dp_rank, ctx.dp)
    root = checkpoint_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    save_checkpoint(engine, loader, ctx, cfg, root, TrainerState(step=0))


def _train_one_step(cfg: ModusConfig, ctx: ParallelContext) -> None:
    cfg.training.steps, cfg.training.ema_decay = 1, EMA_DECAY
    train(cfg, ctx)


def _tp_worker(raw: dict, out: str) -> None:
    out = Path(out)
    tp2 = {"parallel.tp": 2}
    _run_layouts(raw, out, {"tp2": tp2, "tp2_zero3": {**tp2, "parallel.zero_stage": 3}}, _save_untrained)
    if dist.get_rank() == 0:  # the round trip: the untrained run written back as a BAGEL release
        with DeepSpeedRunSource(out / "tp2") as source:
            write_bagel(source, source.config.model, out / "roundtrip", tokenizer_dir=source.tokenizer_dir)
    dist.barrier()
    layouts = {"step_release": tp2, "step_roundtrip": {**tp2, "init.bagel_dir": str(out / "roundtrip")}}
    _run_layouts(raw, out, layouts, _train_one_step)
    dist.destroy_process_group()


def _pp_worker(raw: dict, out: str) -> None:
    layout = {"parallel.tp": 2, "parallel.pp": 2, "parallel.zero_stage": 1}
    _run_layouts(raw, Path(out), {"tp2_pp2_zero1": layout}, _save_untrained)
    dist.destroy_process_group()


def _dp_worker(raw: dict, out: str) -> None:
    layouts = {f"dp2_zero{stage}": {"parallel.zero_stage": stage} for stage in (0, 2, 3)}
    _run_layouts(raw, Path(out), layouts, _train_one_step)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, Tensor]]:
    """The bf16 release, the run config starting from it, and the tensors every fresh run must hold."""
    cfg = tiny_config()
    model, vae = random_reference(cfg)
    path = tmp_path_factory.mktemp("release") / "bagel"
    write_release(path, cfg, model, vae, dtype=torch.bfloat16)
    cfg.init.bagel_dir, cfg.init.seed = str(path), NEW_ROWS_SEED
    cfg.data.token_budget, cfg.training.log_every, cfg.training.optim.warmup_steps = 256, 1, 0
    cfg.training.wandb_mode = "disabled"
    expected = {name: t.detach().bfloat16().float() for name, t in model.state_dict().items()}
    for name in VOCAB_TENSORS:
        text = model.state_dict()[name][: cfg.model.vocab.text_vocab_size].bfloat16()
        expected[name] = extend_vocab_rows(text, model.vocab.padded_size, NEW_ROWS_SEED, name).float()
    expected |= {VAE_PREFIX + name: t.detach().clone() for name, t in vae.state_dict().items()}
    return path, config_to_dict(cfg), expected


@pytest.fixture(scope="module")
def tp_runs(release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tp_runs")
    run_distributed(_tp_worker, 2, release[1], str(out))
    return out


@pytest.fixture(scope="module")
def pp_runs(release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pp_runs")
    run_distributed(_pp_worker, 4, release[1], str(out))
    return out


@pytest.fixture(scope="module")
def dp_runs(release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp_runs")
    run_distributed(_dp_worker, 2, release[1], str(out))
    return out


def _tensors(run: Path, ema: bool = False) -> dict[str, Tensor]:
    with DeepSpeedRunSource(run, ema=ema) as source:
        return dict(source.items())


def _loss(run: Path) -> float:
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return record["loss"]


def test_untrained_tp2_run_exports_the_release_bit_for_bit(release, tp_runs: Path, tmp_path: Path) -> None:
    bagel_dir, _, expected = release
    main(["to-hf", str(tp_runs / "tp2"), str(tmp_path / "hf"), "--max-shard-size", "300KB", "--quiet"])
    with open_hf(tmp_path / "hf") as hf:
        assert sorted(hf.names()) == sorted(expected)
        for name, tensor in expected.items():
            assert hf.dtype(name) == torch.float32 and torch.equal(hf.read(name), tensor), name
    for name, text in TOKENIZER_FILES.items():
        assert (tmp_path / "hf" / name).read_text() == text

    main(["to-bagel", str(tp_runs / "tp2"), str(tmp_path / "bagel"), "--text-vocab-only", "--dtype", "bfloat16"])
    for file in ("ema.safetensors", "ae.safetensors"):
        original, exported = load_file(bagel_dir / file), load_file(tmp_path / "bagel" / file)
        assert exported.keys() == original.keys(), file
        for name, tensor in original.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), (file, name)
    assert json.loads((tmp_path / "bagel" / "llm_config.json").read_text())["vocab_size"] == 512


def test_zero3_at_tp2_exports_what_zero0_does(tp_runs: Path) -> None:
    zero0, zero3 = _tensors(tp_runs / "tp2"), _tensors(tp_runs / "tp2_zero3")
    assert list(zero3) == list(zero0)
    for name, tensor in zero0.items():
        assert torch.equal(zero3[name], tensor), name


def test_untrained_tp2_pp2_run_exports_the_release_bit_for_bit(release, pp_runs: Path) -> None:
    """The issue's case: in at tp=2 x pp=2 (4 ranks), zero steps, out again: every tensor identical."""
    exported = _tensors(pp_runs / "tp2_pp2_zero1")
    assert sorted(exported) == sorted(release[2])
    for name, tensor in release[2].items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor), name


def test_one_step_before_and_after_the_round_trip(tp_runs: Path) -> None:
    assert (tp_runs / "roundtrip" / "ema.safetensors").is_file()
    assert _loss(tp_runs / "step_roundtrip") == _loss(tp_runs / "step_release")
    before, after = _tensors(tp_runs / "step_release"), _tensors(tp_runs / "step_roundtrip")
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_zero_stages_export_the_same_trained_and_ema_weights(release, dp_runs: Path) -> None:
    _, _, initial = release
    trained, ema = _tensors(dp_runs / "dp2_zero0"), _tensors(dp_runs / "dp2_zero0", ema=True)
    frozen = {name for name in trained if name.startswith(VAE_PREFIX) or name.endswith("pos_embed.pos_embed")}
    moved = {name for name, t in trained.items() if not torch.equal(t, initial[name])}
    assert moved == set(trained) - frozen, "the step changes every trainable weight and nothing else"
    for name, tensor in trained.items():  # no EMA averages the frozen tensors: they stay the weights
        reference = tensor if name in frozen else EMA_DECAY * initial[name] + (1 - EMA_DECAY) * tensor
        torch.testing.assert_close(ema[name], reference, rtol=0, atol=1e-6, msg=name)
    # The stages reduce gradients in different orders; Adam's first update, lr * g / (|g| + eps), moves
    # the rare element with |g| near eps differently (by ~1e-6). A misplaced partition moves by ~0.1.
    for stage in (2, 3):
        run = dp_runs / f"dp2_zero{stage}"
        for mine, zero0 in ((_tensors(run), trained), (_tensors(run, ema=True), ema)):
            assert list(mine) == list(zero0)
            for name, tensor in zero0.items():
                torch.testing.assert_close(mine[name], tensor, rtol=0, atol=1e-5, msg=f"ZeRO {stage}: {name}")


def _edit_config(path: Path, edit: Callable[[dict], None]) -> None:
    state = json.loads(path.read_text())
    edit(state["config"])
    path.write_text(json.dumps(state))


class _NotTensorData:
    """Something other than tensors, pickled into a checkpoint file."""


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def _other_model(run: Path) -> None:
    _edit_config(run / TAG / "trainer_state.json", lambda c: c["model"]["llm"].update(intermediate_size=192))


# case -> (run, corruption, what the refusal says)
CORRUPTIONS: dict[str, tuple[str, Callable[[Path], object], str]] = {
    "no latest": ("tp2", lambda run: (run / "checkpoints/latest").unlink(), "holds no completed training checkpoint"),
    "dangling latest": (
        "tp2", lambda run: (run / "checkpoints/latest").write_text("step_00000099"), "step_00000099 does not exist"
    ),
    "no trainer state": (
        "tp2", lambda run: (run / TAG / "trainer_state.json").unlink(), "trainer_state.json does not exist"
    ),
    "missing tp rank": (
        "tp2", lambda run: (run / TAG / "mp_rank_01_model_states.pt").unlink(), "mp_rank_01_model_states.pt is missing"
    ),
    "truncated": ("tp2", lambda run: _truncate(run / TAG / "mp_rank_00_model_states.pt"), "truncated, corrupt"),
    "pickled object": (
        "tp2",
        lambda run: torch.save({"module": _NotTensorData()}, run / TAG / "mp_rank_00_model_states.pt"),
        "holds tests.convert.test_from_training._NotTensorData, which is not tensor data",
    ),
    "missing dp partition": (
        "tp2_zero3",
        lambda run: (run / TAG / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink(),
        "zero_pp_rank_0_mp_rank_01_optim_states.pt is missing",
    ),
    "config of another model": (
        "tp2", _other_model, "'layers.0.experts.0.mlp.gate_proj.weight' is [64, 64] on each of the 2 tp ranks"
    ),
    "no ema": ("tp2", lambda run: None, "holds no EMA weights: its run trained with training.ema_decay = 0.0"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_and_mismatched_runs_are_refused(tp_runs: Path, tmp_path: Path, case: str, capsys) -> None:
    name, corrupt, message = CORRUPTIONS[case]
    run = tmp_path / name
    shutil.copytree(tp_runs / name, run)
    corrupt(run)
    with pytest.raises(SystemExit) as e:
        main(["to-hf", str(run), str(tmp_path / "out"), "--quiet", *(["--ema"] if case == "no ema" else [])])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_to_bagel_needs_a_run_started_from_bagel(tp_runs: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "seeded"
    shutil.copytree(tp_runs / "tp2", run)
    _edit_config(run / TAG / "trainer_state.json", lambda c: c["init"].update(bagel_dir=""))
    with pytest.raises(SystemExit):
        main(["to-bagel", str(run), str(tmp_path / "out"), "--quiet"])
    assert "started from the seeded init (init.bagel_dir is empty)" in capsys.readouterr().err
    main(["to-hf", str(run), str(tmp_path / "hf"), "--quiet"])  # without a VAE
    with open_hf(tmp_path / "hf") as hf:
        assert not any(name.startswith(VAE_PREFIX) for name in hf.names())


def test_a_resumed_run_reads_only_the_vae_from_the_release(release, tmp_path: Path) -> None:
    """The frozen VAE is not in the DeepSpeed checkpoint: a resumed run must still get BAGEL's, not the seeded one."""
    _, raw, expected = release
    cfg = config_with(raw, {}, tmp_path / "run")
    checkpoint_root(cfg).mkdir(parents=True)
    (checkpoint_root(cfg) / "latest").write_text("step_00000001")  # the model's weights would come from here
    ctx = ParallelContext.initialize(cfg.parallel)
    try:
        engine = build_engine(cfg, ctx)
    finally:
        ctx.close()
    vae = engine.vae.state_dict()
    assert vae.keys() == {name[len(VAE_PREFIX) :] for name in expected if name.startswith(VAE_PREFIX)}
    for name, value in vae.items():
        torch.testing.assert_close(value, expected[VAE_PREFIX + name], rtol=0, atol=0)
    weights = engine.model.state_dict()
    name = next(name for name in weights if name in VOCAB_TENSORS)
    assert not torch.equal(weights[name].float(), expected[name]), "the release's model weights were read on resume"


def test_bagel_dir_is_validated_and_skipped_on_resume(release, tp_runs: Path, tmp_path: Path) -> None:
    _, raw, _ = release
    (tmp_path / "empty").mkdir()
    bad = copy.deepcopy(raw)
    bad["init"]["bagel_dir"] = str(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"init\.bagel_dir: .*empty lacks ema\.safetensors, ae\.safetensors"):
        config_from_dict(bad)
    assert resumes_from_checkpoint(config_with(raw, {}, tp_runs / "tp2"))  # its latest exists: BAGEL is not read
    assert not resumes_from_checkpoint(config_with(raw, {"training.resume": False}, tp_runs / "tp2"))
    assert not resumes_from_checkpoint(config_with(raw, {}, tmp_path / "fresh"))
