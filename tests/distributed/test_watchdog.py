"""The watchdog names the rank that died, froze or hung (real processes, gloo, short timeouts).

Stand-in trainers (``watchdog_entry.py``: two ranks, one all-reduce per step, a 10 s
watchdog), all scenarios started at once since they mostly wait. One rank fails at step 2;
the other must exit non-zero with a report naming it:

    kill    rank 1 SIGKILLs itself: rank 0's next all-reduce fails (the collective-error path)
    stop    rank 1 SIGSTOPs itself and collectives never time out: rank 0's watchdog thread
            SIGKILLs the frozen rank 1 (same host: a launcher's SIGTERM could not end it) and
            ends rank 0 from outside its stuck main thread (the stall path)
    sleep   rank 1 sleeps forever in Python, its heartbeat still going: named as hung
    store   rank 0, which serves the c10d store, SIGKILLs itself: rank 1 says so

Alongside, the real entry point, ``launch/pretrain.py`` at dp = 2 (``pretrain_fault_entry.py``),
whose rank 1 SIGKILLs itself at step 2. Subprocess timeouts only guard against hangs;
nothing is timed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modus_mega.parallel.watchdog import Heartbeat, diagnose
from tests.conftest import REPO
from tests.distributed.helpers import rendezvous_store

TIMEOUT_S = 10
HANG_GUARD_S = 240
SCENARIOS = {  # name: (fault, faulty rank, extra arguments)
    "kill": ("kill", 1, []),
    "stop": ("stop", 1, ["--collective-timeout", "3600"]),
    "sleep": ("sleep", 1, []),
    "store": ("kill", 0, []),
}


def _launch(command: list[str], rank: int, log: Path, env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _finish(
    survivor: subprocess.Popen, others: list[subprocess.Popen], faulty: subprocess.Popen
) -> tuple[int, int | None]:
    """The survivor's exit code (hang guard: HANG_GUARD_S) and the faulty rank's, if it ended by then or
    within the guard after (None: it did not); then every process of the run is ended."""
    try:
        code = survivor.wait(timeout=HANG_GUARD_S)
        try:
            return code, faulty.wait(timeout=HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            return code, None
    finally:
        for process in [survivor, *others]:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)  # a stopped process too
                process.wait()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    """Per run (the scenarios and "pretrain"): the surviving rank's exit code and output, the faulty rank's pid."""
    root = tmp_path_factory.mktemp("watchdog")
    runs, faulty = {}, {}
    for name, (fault, fault_rank, extra) in SCENARIOS.items():
        out = root / name
        out.mkdir()
        command = [sys.executable, str(REPO / "tests" / "distributed" / "watchdog_entry.py"), "--out", str(out),
                   "--fault", fault, "--fault-rank", str(fault_rank), "--timeout", str(TIMEOUT_S), *extra]  # fmt: skip
        runs[name] = [_launch(command, rank, out / f"rank{rank}.log", {}) for rank in range(2)]
        faulty[name] = fault_rank
    (root / "pretrain").mkdir()
    command = [sys.executable, str(REPO / "tests" / "distributed" / "pretrain_fault_entry.py"),
               "--config", str(REPO / "configs" / "tiny.json"), "--set", "training.steps=6",
               "--set", "data.token_budget=256", "--set", "training.checkpoint_every=0",
               "--set", "parallel.collective_timeout_s=40",
               "--set", f"training.run_dir={root / 'pretrain' / 'run'}"]  # fmt: skip
    with rendezvous_store() as store_env:  # the store outlives the ranks, as torchrun's agent's does
        env = {**store_env, "FAULT_RANK": "1"}
        runs["pretrain"] = [_launch(command, rank, root / "pretrain" / f"rank{rank}.log", env) for rank in range(2)]
        faulty["pretrain"] = 1
        results = {}
        for name, fault_rank in faulty.items():
            code, fault_code = _finish(runs[name][1 - fault_rank], runs[name], runs[name][fault_rank])
            output = (root / name / f"rank{1 - fault_rank}.log").read_text()
            results[name] = {"returncode": code, "output": output, "fault_pid": runs[name][fault_rank].pid,
                             "fault_returncode": fault_code}  # fmt: skip
    return results


def _named(rank: int, pid: int) -> str:
    return f"rank {rank} (host {socket.gethostname()}, pid {pid})"


def test_a_killed_rank_is_named_when_the_collective_fails(outcomes: dict[str, dict]) -> None:
    result = outcomes["kill"]
    assert result["returncode"] != 0, result["output"][-3000:]
    assert "a collective failed at step 2" in result["output"], result["output"][-3000:]
    assert "rank(s) [1] stopped" in result["output"], result["output"][-3000:]
    assert f"{_named(1, result['fault_pid'])}: STOPPED: no heartbeat" in result["output"], result["output"][-3000:]


def test_a_frozen_rank_is_named_when_the_collective_never_returns(outcomes: dict[str, dict]) -> None:
    result = outcomes["stop"]
    assert result["returncode"] == 1, result["output"][-3000:]  # os._exit(1) from the watchdog thread
    assert "the main thread has made no progress" in result["output"], result["output"][-3000:]
    assert "rank(s) [1] stopped" in result["output"], result["output"][-3000:]
    assert f"{_named(1, result['fault_pid'])}: STOPPED: no heartbeat" in result["output"], result["output"][-3000:]
    # the survivor ended the frozen rank itself: no launcher grace period is spent on it
    assert f"{_named(1, result['fault_pid'])}: frozen on this host, ended with SIGKILL" in result["output"]
    assert result["fault_returncode"] == -signal.SIGKILL


def test_a_dead_rank_is_not_reported_as_ended(outcomes: dict[str, dict]) -> None:
    assert "ended with SIGKILL" not in outcomes["kill"]["output"], outcomes["kill"]["output"][-3000:]


def test_a_hung_rank_is_named_while_its_heartbeat_goes_on(outcomes: dict[str, dict]) -> None:
    result = outcomes["sleep"]
    assert result["returncode"] != 0, result["output"][-3000:]
    assert "rank(s) [1] hung outside any collective" in result["output"], result["output"][-3000:]
    hung = f"{_named(1, result['fault_pid'])}: HUNG: alive, but its main thread has been at step 2"
    assert hung in result["output"], result["output"][-3000:]
    assert "watchdog_entry.py" in result["output"].split(hung)[1].splitlines()[0]  # where it sleeps


def test_the_store_host_dying_is_named(outcomes: dict[str, dict]) -> None:
    result = outcomes["store"]
    assert result["returncode"] != 0, result["output"][-3000:]
    assert "the c10d store at 127.0.0.1:" in result["output"], result["output"][-3000:]
    assert "is unreachable" in result["output"] and "rank 0 has most likely died" in result["output"]


def _beat(rank: int, beat: int, *, waiting: bool, stalled_s: float) -> Heartbeat:
    now = time.time()
    return Heartbeat(rank, "node", 100 + rank, beat, now, 7, now - stalled_s, "train.py:1 in step", waiting)


def test_diagnose_tells_dead_from_hung_from_waiting() -> None:
    first = {r: _beat(r, 5, waiting=True, stalled_s=20) for r in range(4)}
    # rank 1 stopped beating; rank 2 beats but sits outside any collective; rank 3 waits; rank 0 reports
    second = {
        0: first[0],
        1: first[1],
        2: _beat(2, 6, waiting=False, stalled_s=20),
        3: _beat(3, 6, waiting=True, stalled_s=20),
    }
    report = diagnose(first, second, world_size=5, me=0, hung_after_s=3).splitlines()
    assert report[0] == "rank(s) [1, 4] stopped"
    assert report[1].startswith("  rank 0 (host node, pid 100) (this rank): waiting, at step 7")
    assert report[2].startswith("  rank 1 (host node, pid 101): STOPPED: no heartbeat for ")
    assert report[3].startswith("  rank 2 (host node, pid 102): HUNG: alive")
    assert report[4].startswith("  rank 3 (host node, pid 103): waiting, at step 7")
    assert report[5].startswith("  rank 4: no heartbeat at all")
    # without dead ranks, the hung one is the cause; a rank just busy (recent progress) is not hung
    second = {0: first[0], 1: _beat(1, 6, waiting=False, stalled_s=0.5), 2: second[2], 3: second[3]}
    assert diagnose(first, second, 4, me=0, hung_after_s=3).splitlines()[0].startswith("rank(s) [2] hung")
    # the reporting rank itself can be the hung one (never a dead one: it is the one reading)
    second[0] = _beat(0, 6, waiting=True, stalled_s=20)
    assert diagnose(first, second, 4, me=2, hung_after_s=3).splitlines()[0].startswith("rank(s) [2] hung")


def test_pretrain_names_a_dead_rank(outcomes: dict[str, dict]) -> None:
    result = outcomes["pretrain"]
    assert result["returncode"] != 0, result["output"][-3000:]
    assert "RankFailureError" in result["output"], result["output"][-3000:]
    assert "a collective failed at step 2" in result["output"], result["output"][-3000:]
    assert f"{_named(1, result['fault_pid'])}: STOPPED: no heartbeat" in result["output"], result["output"][-3000:]
