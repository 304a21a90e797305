"""Every command prints a user error as one stderr line and exits 2; ``--debug`` shows the traceback.

The commands run as real subprocesses, as a user starts them. Warnings that third-party
packages print while being imported (megatron-core without Transformer Engine on a CPU
machine) come before the command runs and are not counted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from modus_mega.cli import USER_ERROR_EXIT, UserError, one_line, run_cli
from tests.conftest import REPO
from tests.convert.helpers import random_reference, tiny_config, write_release

TINY = str(REPO / "configs" / "tiny.json")
COMMANDS = {  # name: (command line, what the line must say)
    "pretrain": ([str(REPO / "launch" / "pretrain.py"), "--config", TINY, "--set", "training.log_every=0"],
                 "launch/pretrain.py: error: " + f"{TINY}: training.log_every = 0 is out of range"),
    "convert": (["-m", "modus_mega.convert", "from-bagel", "/nonexistent/bagel", "/tmp/never", "--config", TINY],
                "python -m modus_mega.convert: error: /nonexistent/bagel/llm_config.json does not exist"),
    "plan": (["-m", "modus_mega.plan", "--config", TINY, "--gpus", "2", "--set", "training.optim.lr=NaN"],
             f"python -m modus_mega.plan: error: {TINY}: training.optim.lr = nan is out of range"),
    "synth": (["-m", "modus_mega.datasets.synth", "--out", "/nonexistent/synth", "--num-samples", "0"],
              "python -m modus_mega.datasets.synth: error: num_samples (0) and samples_per_shard (256) must be positive"),
    "build_shards": (["-m", "modus_mega.datasets.build_shards", "--images", "/nonexistent/images", "--out",
                      "/nonexistent/shards", "--labelers", "depht"],
                     "python -m modus_mega.datasets.build_shards: error: --labelers: unknown ['depht']"),
    "train_text": (["-m", "modus_mega.datasets.train_text", "--shards", "/nonexistent/shards", "--out", "/nonexistent/tok"],
                   "python -m modus_mega.datasets.train_text: error: /nonexistent/shards/index.json not found"),
    "train_vq": (["-m", "modus_mega.datasets.train_vq", "--shards", "/nonexistent/shards", "--out", "/nonexistent/vq",
                  "--codebook-size", "0"],
                 "python -m modus_mega.datasets.train_vq: error: --codebook-size and --tokens-per-global must be positive"),
    "generate": (["-m", "modus_mega.generate", "--ckpt", "/nonexistent/ckpt", "--target", "depth", "--out", "/nonexistent/gen"],
                 "python -m modus_mega.generate: error: --ckpt /nonexistent/ckpt: no such directory"),
    "eval": (["-m", "modus_mega.eval", "--ckpt", "/nonexistent/ckpt", "--out", "/nonexistent/eval"],
             "python -m modus_mega.eval: error: --ckpt /nonexistent/ckpt: no such directory"),
    "ablations": (["-m", "modus_mega.eval.ablations", "steps", "--step-list", "0,x", "--out", "/nonexistent/ablation"],
                  "python -m modus_mega.eval.ablations: error: --step-list '0,x' must be positive integers"),
    "demo": (["-m", "modus_mega.demo", "--ckpt", "/nonexistent/ckpt"],
             "python -m modus_mega.demo: error: --ckpt /nonexistent/ckpt: no such directory"),
}  # fmt: skip


_IMPORT_WARNING = re.compile(r"^\S*site-packages\S*:\d+: \w*Warning: ")


def _own_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` minus third-party import warnings (each a header and an indented source line)."""
    lines, kept = stderr.strip().splitlines(), []
    for i, line in enumerate(lines):
        if not (_IMPORT_WARNING.match(line) or (i and _IMPORT_WARNING.match(lines[i - 1]) and line.startswith(" "))):
            kept.append(line)
    return kept


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    if "MODUS_DEBUG" not in env:
        environment.pop("MODUS_DEBUG", None)
    return subprocess.run([sys.executable, *args], env=environment, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_user_error_is_one_line_and_exit_2(name: str) -> None:
    args, message = COMMANDS[name]
    result = _run(args)
    assert result.returncode == USER_ERROR_EXIT, result.stderr
    lines = _own_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr and "--debug" in lines[0]


def test_debug_shows_the_traceback() -> None:
    args, _ = COMMANDS["plan"]
    for result in (_run([*args, "--debug"]), _run(args, MODUS_DEBUG="1")):
        assert result.returncode != 0 and "Traceback" in result.stderr and "ValueError" in result.stderr


def test_only_rank_0_prints_under_a_launcher() -> None:
    args, message = COMMANDS["plan"]  # the lightest command; the choice is run_cli's, the same for all
    rank1 = _run(args, RANK="1", WORLD_SIZE="2")
    assert rank1.returncode == USER_ERROR_EXIT and _own_lines(rank1.stderr) == []
    rank0 = _run(args, RANK="0", WORLD_SIZE="2")
    assert rank0.returncode == USER_ERROR_EXIT and _own_lines(rank0.stderr)[0].startswith(message)


def test_one_line_of_each_kind(tmp_path: Path) -> None:
    assert one_line(ValueError("a\n  b\n")) == "a; b"
    assert one_line(UserError("no GPU")) == "no GPU"
    missing = tmp_path / "x.json"
    try:
        missing.read_text()
    except FileNotFoundError as error:
        assert one_line(error) == f"{missing}: No such file or directory; check the path"


def test_after_start_up_every_rank_prints_with_its_rank(monkeypatch, capsys) -> None:
    """An error raised once the process group exists may be this rank's own: rank 1 prints it too."""
    def fail(argv: list[str]) -> None:
        raise ValueError("shard 7 is truncated; rebuild it")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run_cli(fail, [], prog="cmd")
    assert capsys.readouterr().err == ""  # before start-up: rank 0's line is enough
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli(fail, [], prog="cmd")
    finally:
        dist.destroy_process_group()
    assert exit_.value.code == USER_ERROR_EXIT
    assert capsys.readouterr().err.startswith("rank 1: cmd: error: shard 7 is truncated; rebuild it (--debug")


def test_pretrain_lists_every_mismatch_with_init_bagel_dir_before_starting(tmp_path: Path) -> None:
    cfg = tiny_config()
    write_release(tmp_path / "bagel", cfg, *random_reference(cfg))
    args = [str(REPO / "launch" / "pretrain.py"), "--config", TINY, "--set", f"init.bagel_dir={tmp_path / 'bagel'}",
            "--set", "model.vae.norm_groups=4", "--set", "model.vae.scale_factor=0.5",
            "--set", f"training.run_dir={tmp_path / 'run'}"]  # fmt: skip
    result = _run(args)
    lines = _own_lines(result.stderr)
    assert result.returncode == USER_ERROR_EXIT and len(lines) == 1, result.stderr
    assert "does not match the BAGEL release" in lines[0] and "in 2 field(s)" in lines[0], lines[0]
    assert "--set model.vae.norm_groups=8 --set model.vae.scale_factor=0.3611" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything started
