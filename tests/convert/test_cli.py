"""``python -m modus_mega.convert``: the four commands end to end, refusals, atomic output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modus_mega.convert.__main__ import main
from tests.convert.helpers import REPO, random_reference, tiny_config, write_release


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("cli") / "bagel"
    return path, write_release(path, cfg, *random_reference(cfg))


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("from-bagel", "to-bagel", "to-hf", "from-hf", "universal"):
        assert command in text


def test_commands_chain_back_to_the_input(release, tmp_path: Path) -> None:
    src, ema = release
    config = str(REPO / "configs" / "tiny.json")
    main(["from-bagel", str(src), str(tmp_path / "hf"), "--config", config, "--max-shard-size", "100KB", "--quiet"])
    main(["to-hf", str(tmp_path / "hf"), str(tmp_path / "hf2"), "--dtype", "bfloat16", "--quiet"])
    main(["from-hf", str(tmp_path / "hf2"), str(tmp_path / "hf3"), "--dtype", "float32", "--quiet"])
    main(["to-bagel", str(tmp_path / "hf"), str(tmp_path / "bagel"), "--text-vocab-only", "--quiet"])
    out = load_file(tmp_path / "bagel" / "ema.safetensors")
    assert out.keys() == ema.keys() and all(torch.equal(out[k], ema[k]) for k in ema)
    a, b = load_file(tmp_path / "hf2" / "model-00001-of-00001.safetensors"), load_file(
        tmp_path / "hf3" / "model-00001-of-00001.safetensors"
    )
    assert a["lm_head.weight"].dtype == torch.bfloat16 and b["lm_head.weight"].dtype == torch.float32
    assert torch.equal(a["lm_head.weight"].float(), b["lm_head.weight"])


def test_refusals_exit_with_the_reason_and_write_nothing(release, tmp_path: Path, capsys) -> None:
    src, _ = release
    with pytest.raises(SystemExit) as e:
        main(["to-hf", str(src), str(tmp_path / "out"), "--quiet"])
    assert e.value.code == 2 and "use from-bagel" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main(["from-bagel", str(src), str(tmp_path / "taken"), "--config", str(REPO / "configs" / "tiny.json")])
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["from-bagel", str(src), str(tmp_path / "out"), "--config", str(REPO / "configs" / "tiny.json"),
              "--set", "model.llm.intermediate_size=96", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert "intermediate_size = 128, but the model config has model.llm.intermediate_size = 96" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
