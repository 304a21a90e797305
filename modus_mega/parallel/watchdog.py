"""A dead or hung rank ends the job with that rank named.

Without this, a rank that dies (killed, out of memory, crashed) or hangs leaves the others
inside a collective until ``parallel.collective_timeout_s``; then they fail with gloo's or
NCCL's error, which names a socket or an operation but not the rank (and some NCCL hangs
never return at all). So every rank of a multi-process run holds a ``Watchdog``:

- Heartbeat. A daemon thread writes this rank's ``Heartbeat`` (host, pid, the step the
  main thread last began, where the main thread is right now, a beat counter, the wall
  clock) into the job's c10d store every ``interval_s`` and whenever a step begins, over
  its own client connection.
- Diagnosis (``diagnose``). Every rank's heartbeat is read twice, ``settle_s`` apart on
  this rank's clock (whether a rank stopped never depends on two hosts' clocks agreeing;
  the seconds reported do): a rank whose beat counter did not move is dead or frozen,
  its heartbeat thread stopped with it; a rank that still
  beats but whose main thread has sat outside any collective for a while is hung (a
  deadlock, a stuck read, an endless loop) and the others wait for it. A store that cannot
  be reached means its host died: rank 0's process (torch's ``env://`` rendezvous), or
  under torchrun the agent on rank 0's node.
- Two triggers. A collective error leaving the ``with Watchdog(...)`` block around
  training is re-raised as ``RankFailureError`` carrying the diagnosis. A main thread that
  has made no ``progress`` for ``stall_after_s`` (stuck in C++ in a collective) is ended
  from the watchdog thread: the diagnosis goes to stderr, then ``os._exit(1)``.
  ``stall_after_s`` leaves the diagnosis time to finish before a collective begun with
  the step reaches ``timeout_s``, when NCCL's own error handling
  (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``) would abort the process unexplained. After a
  diagnosed error the thread also ends a shutdown that hangs (NCCL's teardown with a dead
  peer can) ``timeout_s`` later.
- Frozen peers on this host are ended. A rank whose heartbeat stopped but whose process
  still exists (SIGSTOPped, or stuck in C code holding the GIL) ignores the SIGTERM with
  which the launcher (deepspeed's, torchrun's agent) ends the job, and the launcher waits 30 s
  more before its SIGKILL. So the diagnosing rank SIGKILLs the stopped ranks on its own host
  (their host and pid are in the heartbeats) and says so in the report. The job then ends
  within ``parallel.collective_timeout_s`` of the freeze: the stall report is out by
  ``timeout_s - interval_s``, and the launcher notices an exited rank within a second. This
  holds while every host keeps a live rank; a host whose every rank froze is ended by the
  launcher's grace or the scheduler.

The stall clock runs from one ``progress`` call to the next (the loop calls it when a step
begins and after a checkpoint), so ``parallel.collective_timeout_s`` must exceed the
longest step by a margin (``stall_after_s`` is at least half of it), not only the longest
collective. One process alone runs no watchdog.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import torch.distributed as dist

# Frames from these files mean the main thread waits on other ranks: in a collective (DeepSpeed's comm wraps
# torch's), or reporting a failed one here.
_WAITING_PATHS = (f"torch{os.sep}distributed{os.sep}", f"deepspeed{os.sep}comm{os.sep}", __file__)
_KEY_PREFIX = "modus/watchdog"
_SETTLE_BEATS = 3  # heartbeats between the diagnosis' two readings


class RankFailureError(RuntimeError):
    """A collective failed; the message names the rank(s) that stopped or hung."""


@dataclass(frozen=True)
class Heartbeat:
    """What one rank publishes at every beat."""

    rank: int
    host: str
    pid: int
    beat: int  # counts this rank's heartbeats
    time: float  # wall clock of this beat (time.time())
    step: int  # the step the main thread last began (-1: none yet)
    progress_time: float  # wall clock of the main thread's last progress
    where: str  # the main thread's innermost frame outside this module: "path:line in function"
    waiting: bool  # the main thread waits on other ranks (see _WAITING_PATHS)

    @property
    def who(self) -> str:
        """``rank 3 (host node7, pid 4242)``."""
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective or the store (a peer died, hung or timed out).

    torch raises ``DistError`` subclasses for NCCL and the store, but gloo's errors are plain
    ``RuntimeError``s whose message names gloo.
    """
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in ("gloo", "NCCL", "c10d"))


def diagnose(
    first: dict[int, Heartbeat], second: dict[int, Heartbeat], world_size: int, me: int, hung_after_s: float
) -> str:
    """Which ranks stopped or hung, from two readings of the heartbeats (rank -> beat) taken apart.

    A rank is dead or frozen when its beat did not move between the readings (or it never
    beat), hung when it beats but its main thread has spent ``hung_after_s`` or more outside
    any collective since its last progress. This rank (``me``) can only be hung. Returns the
    verdict line, then one line per rank.
    """
    now = time.time()
    stopped, hung, lines = [], [], []
    for rank in range(world_size):
        beat = second.get(rank)
        if beat is None:
            stopped.append(rank)
            lines.append(f"rank {rank}: no heartbeat at all: it died or hung before the watchdog started")
            continue
        who = beat.who + (" (this rank)" if rank == me else "")
        stalled_s = now - beat.progress_time
        if _stopped_beating(rank, first, second, me):
            stopped.append(rank)
            lines.append(
                f"{who}: STOPPED: no heartbeat for {now - beat.time:.1f} s, last at step {beat.step}; the process "
                "died or is frozen (killed, out of memory, crashed, stopped)"
            )
        elif not beat.waiting and stalled_s >= hung_after_s:
            hung.append(rank)
            lines.append(
                f"{who}: HUNG: alive, but its main thread has been at step {beat.step} for {stalled_s:.1f} s "
                f"outside any collective, now at {beat.where}"
            )
        else:
            lines.append(f"{who}: waiting, at step {beat.step}, at {beat.where}")
    if stopped:
        verdict = f"rank(s) {stopped} stopped"
    elif hung:
        verdict = f"rank(s) {hung} hung outside any collective while the others waited"
    else:
        verdict = "every rank is alive and inside a collective: mismatched collectives or a network fault"
    return "\n".join([verdict, *("  " + line for line in lines)])


def _stopped_beating(rank: int, first: dict[int, Heartbeat], second: dict[int, Heartbeat], me: int) -> bool:
    """Whether ``rank`` (not ``me``) beat in both readings with the same counter: dead or frozen."""
    return rank != me and rank in first and rank in second and first[rank].beat == second[rank].beat


def end_frozen_on_host(first: dict[int, Heartbeat], second: dict[int, Heartbeat], me: int, host: str) -> list[str]:
    """SIGKILL every rank on ``host`` that stopped beating and whose process still exists; one line per rank ended.

    A frozen process cannot act on the launcher's SIGTERM, so the launcher would wait its
    grace period (30 s) before killing it; a dead one is already gone (nothing to do).
    """
    ended = []
    for rank, beat in sorted(second.items()):
        if beat.host != host or not _stopped_beating(rank, first, second, me) or not _is_running(beat.pid):
            continue
        try:
            os.kill(beat.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue  # already gone (a dead rank), or not ours to end
        ended.append(f"{beat.who}: frozen on this host, ended with SIGKILL so that the launcher need not wait for it")
    return ended


def _is_running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead, not yet reaped by its launcher)."""
    if not Path("/proc/self/stat").exists():  # no procfs: only whether the pid exists
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the parenthesised command name


def _first_line(error: BaseException) -> str:
    """``RuntimeError: <the message's first line>``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _main_thread_position(thread_id: int) -> tuple[str, bool]:
    """(innermost frame outside this module as "path:line in function", whether it waits on other ranks)."""
    frame = sys._current_frames().get(thread_id)
    stack = [f for f, _ in traceback.walk_stack(frame)] if frame is not None else []  # innermost first
    outside = [f for f in stack if f.f_code.co_filename != __file__]
    where = f"{outside[0].f_code.co_filename}:{outside[0].f_lineno} in {outside[0].f_code.co_name}" if outside else "?"
    waiting = any(path in f.f_code.co_filename for f in stack for path in _WAITING_PATHS)
    return where, waiting


class Watchdog:
    """This rank's heartbeat, and the diagnosis when a collective fails or the main thread stalls.

    Use as a context manager around training, from the thread that trains; call
    ``progress(step)`` as each step begins. The store is the job's own (``MASTER_ADDR``,
    ``MASTER_PORT``), as ``ParallelContext`` initialised it.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = min(5.0, timeout_s / 10)  # between heartbeats
        self.settle_s = _SETTLE_BEATS * self.interval_s  # between the diagnosis' two readings
        # a stall is reported (one tick late at most, after settle_s) before timeout_s: at least timeout_s / 2
        self.stall_after_s = timeout_s - self.settle_s - 2 * self.interval_s
        self.store_address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._main = threading.get_ident()  # the thread that trains
        self._step, self._progress_wall, self._progress_mono = -1, time.time(), None  # None: not armed yet
        self._beat = 0
        self._store: dist.Store | None = None
        self._store_lock = threading.Lock()  # one client connection, used from two threads
        self._report_lock = threading.Lock()  # held by whichever thread diagnoses first
        self._failed_at: float | None = None  # monotonic time of a diagnosed collective error
        self._wake = threading.Event()  # set: publish now (a step began, or the watchdog stops)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="modus-watchdog", daemon=True)

    # ------------------------------------------------------------------ main thread

    def __enter__(self) -> "Watchdog":
        if self.world_size > 1:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            client = dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=self.settle_s), wait_for_workers=False
            )
            self._store = dist.PrefixStore(_KEY_PREFIX, client)
            self._publish()
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._store is None:
            return
        if error is None or not is_collective_failure(error):
            self._stopping = True
            self._wake.set()
            self._thread.join()
            return
        with self._report_lock:  # if the watchdog thread is diagnosing a stall, it ends the process
            report = self._report(f"a collective failed at step {self._step} ({_first_line(error)})")
            print(report, file=sys.stderr, flush=True)  # before any teardown that may hang
            self._failed_at = time.monotonic()  # the thread now ends a hung shutdown
        raise RankFailureError(report) from error

    def progress(self, step: int) -> None:
        """The main thread is alive at ``step`` (restarts the stall clock; the first call arms it)."""
        self._step, self._progress_wall, self._progress_mono = step, time.time(), time.monotonic()
        self._wake.set()  # the heartbeat thread publishes the new step now

    # ------------------------------------------------------------------ watchdog thread

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stopping:
                return
            self._publish()
            if self._failed_at is not None:
                if time.monotonic() - self._failed_at > self.timeout_s:
                    message = f"rank {self.rank}: the shutdown after the failure above hung for {self.timeout_s:g} s"
                    print(message, file=sys.stderr, flush=True)
                    os._exit(1)
            elif self._stalled() and self._report_lock.acquire(blocking=False):
                where, waiting = _main_thread_position(self._main)
                stalled_s = time.monotonic() - self._progress_mono
                cause = "" if waiting else ", outside any collective: this rank itself is stuck"
                print(self._report(
                    f"the main thread has made no progress for {stalled_s:.0f} s at step {self._step} "
                    f"(the limit is {self.stall_after_s:g} s for parallel.collective_timeout_s={self.timeout_s:g}), "
                    f"now at {where}{cause}"
                ), file=sys.stderr, flush=True)  # fmt: skip
                os._exit(1)  # the main thread may be stuck in C++: no exception can reach it

    def _stalled(self) -> bool:
        return self._progress_mono is not None and time.monotonic() - self._progress_mono > self.stall_after_s

    def _publish(self) -> None:
        where, waiting = _main_thread_position(self._main)
        try:
            with self._store_lock:
                self._beat += 1
                beat = Heartbeat(
                    self.rank, self._host, self._pid, self._beat, time.time(), self._step, self._progress_wall, where, waiting
                )
                self._store.set(str(self.rank), json.dumps(asdict(beat)))
        except RuntimeError:  # torch's store errors; the store's host is gone, and the diagnosis will say so
            pass

    # ------------------------------------------------------------------ diagnosis

    def _read(self) -> dict[int, Heartbeat]:
        beats = {}
        with self._store_lock:
            for rank in range(self.world_size):
                if self._store.check([str(rank)]):
                    beats[rank] = Heartbeat(**json.loads(self._store.get(str(rank))))
        return beats

    def _report(self, trigger: str) -> str:
        """``trigger`` plus the diagnosis; takes ``settle_s`` (two readings of the heartbeats).

        This rank goes on beating meanwhile, from whichever thread diagnoses, so that a rank
        diagnosing at the same time is never taken for a dead one.
        """
        head = f"rank {self.rank} (host {self._host}, pid {self._pid}): {trigger}."
        try:
            first = self._read()
            for _ in range(_SETTLE_BEATS):
                time.sleep(self.interval_s)
                self._publish()
            second = self._read()
        except RuntimeError as error:  # torch's store errors
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                owner, dead = "the launcher's agent on rank 0's node", "rank 0's node"
            else:
                owner, dead = "rank 0's process (env:// rendezvous)", "rank 0"
            return (
                f"{head}\nThe heartbeats cannot be read: the c10d store at {self.store_address} is unreachable "
                f"({_first_line(error)}). It is served by {owner}, so "
                f"{dead} has most likely died; look at its log."
            )
        verdict = diagnose(first, second, self.world_size, self.rank, hung_after_s=self.settle_s)
        ended = end_frozen_on_host(first, second, self.rank, self._host)
        report = f"{head}\nWatchdog (heartbeats in the c10d store at {self.store_address}): {verdict}"
        return "\n".join([report, *ended])
