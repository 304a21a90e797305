"""Conversion refuses tampered weights: NaN / Inf values and dtype changes nobody asked for.

Each case tampers with one tensor of a tiny BAGEL release and runs the real command
(``python -m modus_mega.convert from-bagel``, in process) and the training-time loader
(``load_bagel_into``); the explicit flag (``--allow-nonfinite``, ``--dtype``) lets it through.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modus_mega.convert.__main__ import main
from modus_mega.convert.bagel import load_bagel_into
from modus_mega.model.modus import ModusModel
from tests.convert.helpers import REPO, random_reference, tiny_config, write_release

TINY = str(REPO / "configs" / "tiny.json")
WEIGHT = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("release") / "bagel"
    write_release(path, cfg, *random_reference(cfg))
    return path


def tampered(release: Path, out: Path, change) -> Path:
    """A copy of ``release`` whose ``WEIGHT`` is ``change(weight)``."""
    shutil.copytree(release, out)
    tensors = load_file(out / "ema.safetensors")
    tensors[WEIGHT] = change(tensors[WEIGHT])
    save_file(tensors, out / "ema.safetensors")
    return out


def with_nan(weight: torch.Tensor) -> torch.Tensor:
    weight = weight.clone()
    weight[3, 5] = float("nan")
    return weight


def as_int32(weight: torch.Tensor) -> torch.Tensor:
    return (weight * 100).to(torch.int32)


def convert(src: Path, out: Path, *flags: str) -> None:
    main(["from-bagel", str(src), str(out), "--config", TINY, "--quiet", *flags])


@pytest.mark.parametrize(
    ("change", "message", "flag"),
    [
        (with_nan, "holds 1 non-finite value(s) (NaN/Inf)", "--allow-nonfinite"),
        (as_int32, "tensor(s) are not floating point", "--dtype=float32"),
    ],
    ids=["nan", "int32"],
)
def test_from_bagel_refuses_and_the_flag_allows(release: Path, tmp_path: Path, capsys, change, message, flag) -> None:
    src = tampered(release, tmp_path / "src", change)
    with pytest.raises(SystemExit) as exit_:
        convert(src, tmp_path / "out")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "up_proj.weight" in err and flag.split("=")[0] in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-written
    convert(src, tmp_path / "out", flag)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(("change", "message"), [(with_nan, "non-finite"), (as_int32, "not floating point")])
def test_training_init_refuses_them(release: Path, tmp_path: Path, change, message: str) -> None:
    src = tampered(release, tmp_path / "src", change)
    with pytest.raises(ValueError, match=message):
        load_bagel_into(ModusModel(tiny_config().model), None, src)
