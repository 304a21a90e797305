"""Checkpoint integrity without training (``checkpoint_integrity.py``, ``safe_loading.py``, ``read_jsonl``).

Tags are small directories written here with the real layout's file names; each damage
case of issue 15 (truncated model or extras file, missing file, ``latest`` naming a missing
tag or empty, truncated ``trainer_state.json``) must be refused with the tag named and the
newest complete tag proposed, and taken with ``fallback``. A pickle whose ``__reduce__``
would create a marker file is refused by name and the marker never appears.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from modus_mega.checkpoint_integrity import (
    DAMAGED_SUFFIX,
    LATEST,
    MANIFEST,
    CheckpointWriteError,
    DamagedCheckpointError,
    apply_retention,
    atomic_write_text,
    clean_stale,
    find_resume_tag,
    tag_for_step,
    verify_tag,
    write_errors,
    write_manifest,
)
from modus_mega.checkpoint_layout import latest_tag
from modus_mega.config import ModusConfig, validate
from modus_mega.safe_loading import UnsafeCheckpointError, safe_load
from modus_mega.training.metrics import read_jsonl
from tests.reliability.helpers import checkpoint_cases

MODEL = "mp_rank_00_model_states.pt"
EXTRAS = "extras/rank_00000.pt"
STATE = "trainer_state.json"
Evil = checkpoint_cases().Evil  # unpickling it would create a marker file


def _save_tag(root: Path, step: int, point_latest: bool = True) -> Path:
    """A complete tag as save_checkpoint leaves it: model, extras, trainer state, manifest; ``latest`` moved."""
    tag_dir = root / tag_for_step(step)
    (tag_dir / "extras").mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64,), float(step))}, "dp_world_size": 1}, tag_dir / MODEL)
    torch.save({"rng": {"torch": torch.get_rng_state()}, "loader": {"step": step}}, tag_dir / EXTRAS)
    (tag_dir / STATE).write_text(json.dumps({"step": step, "config": {}}) + "\n")
    write_manifest(tag_dir, [STATE, EXTRAS])
    if point_latest:
        atomic_write_text(root / LATEST, tag_for_step(step))
    return tag_dir


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated model file": lambda tag: _truncate(tag / MODEL),
    "truncated extras file": lambda tag: _truncate(tag / EXTRAS),
    "missing model file": lambda tag: (tag / MODEL).unlink(),
    "truncated trainer_state.json": lambda tag: _truncate(tag / STATE),
    "changed byte": lambda tag: (tag / MODEL).write_bytes(bytes([(tag / MODEL).read_bytes()[0] ^ 1]) + (tag / MODEL).read_bytes()[1:]),
    "latest names a missing tag": lambda tag: (tag.parent / LATEST).write_text("step_00000009"),
    "latest is empty": lambda tag: (tag.parent / LATEST).write_text(""),
    "no manifest": lambda tag: (tag / MANIFEST).unlink(),
}  # fmt: skip


def test_complete_tag_verifies_and_is_resumed(tmp_path: Path) -> None:
    _save_tag(tmp_path, 2)
    _save_tag(tmp_path, 4)
    assert verify_tag(tmp_path / "step_00000004") is None
    assert find_resume_tag(tmp_path, fallback=False) == "step_00000004"
    assert find_resume_tag(tmp_path / "none", fallback=False) is None  # a fresh run


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_latest_is_refused_naming_it_and_the_newest_complete_tag(tmp_path: Path, case: str) -> None:
    _save_tag(tmp_path, 2)
    DAMAGE[case](_save_tag(tmp_path, 4))
    with pytest.raises(DamagedCheckpointError) as refused:
        find_resume_tag(tmp_path, fallback=False)
    message = str(refused.value)
    pointer_damaged = case.startswith("latest")  # then step 4 is complete and proposed
    proposed = "step_00000004" if pointer_damaged else "step_00000002"
    assert f"newest complete tag is {proposed}" in message and "training.resume=fallback" in message, message
    assert (str(tmp_path / LATEST) if pointer_damaged else f"step_00000004 (named by") in message, message


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_fallback_takes_the_newest_complete_tag_and_logs_it(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    _save_tag(tmp_path, 2)
    _save_tag(tmp_path, 4)
    DAMAGE[case](_save_tag(tmp_path, 6))
    good = "step_00000006" if case.startswith("latest") else "step_00000004"  # a damaged pointer: the tags are fine
    with caplog.at_level(logging.WARNING):
        assert find_resume_tag(tmp_path, fallback=True) == good
    assert f"fallback: resuming from {good}" in caplog.text
    assert latest_tag(tmp_path) == good  # latest names a verified tag again
    if good == "step_00000004":
        assert not (tmp_path / "step_00000006").exists()  # a new save may reuse the name
        assert (tmp_path / ("step_00000006" + DAMAGED_SUFFIX)).is_dir()  # kept for inspection


def test_no_complete_tag_left_says_so(tmp_path: Path) -> None:
    _truncate(_save_tag(tmp_path, 2) / MODEL)
    with pytest.raises(DamagedCheckpointError, match="no complete tag remains"):
        find_resume_tag(tmp_path, fallback=True)


def test_stale_partial_tags_and_tmp_files_are_removed(tmp_path: Path) -> None:
    _save_tag(tmp_path, 2)
    partial = _save_tag(tmp_path, 4, point_latest=False)  # killed before latest moved
    (partial / MANIFEST).unlink()
    killed_later = tmp_path / "step_00000006" / "extras"
    killed_later.mkdir(parents=True)
    (killed_later / "rank_00000.pt.tmp").write_bytes(b"half")
    (tmp_path / "latest.tmp").write_text("step_0000")
    _save_tag(tmp_path, 8, point_latest=False)  # complete, latest not moved (or pointed back by hand): kept
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000002", "step_00000008"], removed
    assert find_resume_tag(tmp_path, fallback=False) == "step_00000002"


def test_without_latest_only_tags_without_manifest_are_partial(tmp_path: Path) -> None:
    (_save_tag(tmp_path, 2, point_latest=False) / MANIFEST).unlink()
    clean_stale(tmp_path)
    assert not (tmp_path / "step_00000002").exists()
    assert find_resume_tag(tmp_path, fallback=False) is None


def test_retention_keeps_the_newest_and_the_milestones_never_latest(tmp_path: Path) -> None:
    for step in range(1, 9):
        _save_tag(tmp_path, step)
        apply_retention(tmp_path, keep_last=2, keep_every=4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for_step(s) for s in (4, 7, 8)]
    (tmp_path / LATEST).write_text(tag_for_step(4))  # latest names an older tag: it and newer ones stay
    assert apply_retention(tmp_path, keep_last=1, keep_every=0) == []
    assert apply_retention(tmp_path, keep_last=0, keep_every=0) == []  # 0 keeps all


def test_disk_full_names_the_path_and_the_space(tmp_path: Path) -> None:
    path = tmp_path / "rank_00000.pt"
    with pytest.raises(CheckpointWriteError) as full:
        with write_errors(path, 3 * 2**30):
            raise OSError(errno.ENOSPC, "No space left on device")  # what the writer raises on a full disk
    message = str(full.value)
    assert "no space left" in message and str(path) in message and "3.00 GiB" in message and "free" in message


def test_torch_zip_writer_error_on_full_disk_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports ENOSPC as ``unexpected pos``; the free space decides."""
    monkeypatch.setattr("modus_mega.checkpoint_integrity._free_bytes", lambda path: 1000)
    with pytest.raises(CheckpointWriteError, match="no space left"):
        with write_errors(tmp_path / "x.pt", 5000):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 615296 vs 615184")


def test_read_only_directory_is_named(tmp_path: Path) -> None:
    """Tests run as root, whom chmod does not stop: a file where the directory belongs, and EROFS raised."""
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointWriteError, match="is not a directory"):
        atomic_write_text(tmp_path / "checkpoints" / LATEST, "step_00000001")
    with pytest.raises(CheckpointWriteError, match="not writable.*Read-only file system"):
        with write_errors(tmp_path / "x.pt", 10):
            raise OSError(errno.EROFS, "Read-only file system")


def test_other_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unrelated"):
        with write_errors(tmp_path / "x.pt", 10):
            raise RuntimeError("unrelated")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker, path = tmp_path / "marker", tmp_path / MODEL
    torch.save({"module": {"w": torch.ones(2)}, "args": Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as refused:
        safe_load(path)
    assert str(path) in str(refused.value) and "system" in str(refused.value), refused.value
    assert not marker.exists()


def test_deepspeed_objects_load_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states,
             "mappings": {"w": fragment_address(numel=4, start=2)}}  # fmt: skip
    torch.save(saved, path)
    loaded = safe_load(path)
    assert loaded["zero_stage"] == ZeroStageEnum.optimizer_states and loaded["mappings"]["w"].start == 2
    assert loaded["loss_scaler"].cur_scale == 1.0


def test_truncated_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / EXTRAS.split("/")[1]
    torch.save({"x": torch.ones(1000)}, path)
    _truncate(path)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        safe_load(path)


def test_torn_last_line_of_the_log_is_dropped_and_others_are_not(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0}\n{"step": 1}\n{"st')
    assert read_jsonl(log) == [{"step": 0}, {"step": 1}]
    log.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_jsonl(log)


@pytest.mark.parametrize("key, value", [("resume", 1), ("resume", 0.0), ("keep_last", -1), ("keep_every", -2)])
def test_config_rejects(tiny_config: ModusConfig, key: str, value: float) -> None:
    setattr(tiny_config.training, key, value)
    with pytest.raises(ValueError, match=f"training.{key}"):
        validate(tiny_config)
