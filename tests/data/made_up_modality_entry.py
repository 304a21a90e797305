"""``launch/pretrain.py`` with the made-up modalities appended to the table first (arguments pass through).

Training code may read the table when it is imported, so the table is extended before
anything else of modus_mega is imported.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from modus_mega import modalities
from tests.data.made_up_modalities import extended_table

if __name__ == "__main__":
    modalities.MODALITIES = extended_table()
    script = str(Path(__file__).resolve().parents[2] / "launch" / "pretrain.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")
