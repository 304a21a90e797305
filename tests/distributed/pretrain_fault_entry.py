"""``launch/pretrain.py`` whose rank ``$FAULT_RANK`` SIGKILLs itself as step 2 begins (the watchdog test).

    FAULT_RANK=1 python tests/distributed/pretrain_fault_entry.py --config ... [--set ...]

The fault is injected by wrapping the training loop's ``learning_rate`` (called once per
step, before any collective of the step), so production code carries no fault hook.
"""

from __future__ import annotations

import os
import runpy
import signal
from pathlib import Path

import modus_mega.training.loop as loop

FAULT_STEP = 2


def main() -> None:
    """Install the fault, then run launch/pretrain.py with this process's arguments."""
    learning_rate = loop.learning_rate

    def faulty_learning_rate(step: int, *args, **kwargs) -> float:
        if step == FAULT_STEP and os.environ["RANK"] == os.environ["FAULT_RANK"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return learning_rate(step, *args, **kwargs)

    loop.learning_rate = faulty_learning_rate
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"), run_name="__main__")


if __name__ == "__main__":
    main()
