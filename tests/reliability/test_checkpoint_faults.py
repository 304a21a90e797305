"""The checkpoint fault matrix (``bench/reliability/checkpoint_faults.py``), small: every case once.

Tampered files (each pickle of a ZeRO-1 tag, with and without the manifest rewritten),
one random truncation per file, missing files, damaged ``latest``, ENOSPC at each write of
a save and torch's own full-disk error, and four read-only / not-a-directory cases: every
one must be held (refused or reported as the module describes).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.distributed.helpers import run_distributed
from tests.reliability.helpers import checkpoint_faults


def _worker(out: str) -> None:
    checkpoint_faults().run_matrix(Path(out), truncations=1, bit_flips=0)


def test_every_checkpoint_fault_is_held(tmp_path: Path) -> None:
    run_distributed(_worker, 1, str(tmp_path))
    report = json.loads((tmp_path / "checkpoint_faults.json").read_text())
    assert report["not_held"] == [], report
    assert set(report["results"]) == {"tampered", "truncated", "missing", "pointer", "disk_full", "read_only"}
    assert sum(tried for tried, _ in report["results"].values()) >= 30
