"""Run outputs: a JSONL metrics log and a PNG of the loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


class JsonlLog:
    """Appends one JSON object per line; flushed every write so a crash loses nothing logged."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL log."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(records: list[dict[str, Any]], path: str | Path) -> None:
    """Plot total, CE, MSE and per-target-modality losses against the step."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r["step"] for r in records]
    for key in ("loss", "ce", "mse"):
        axes[0].plot(steps, [r.get(key) for r in records], label=key)
    axes[0].set(xlabel="step", ylabel="loss", title="objective", yscale="log")
    modality_keys = sorted({k for r in records for k in r if k.startswith("loss/")})
    for key in modality_keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        axes[1].plot(*zip(*points), label=key.removeprefix("loss/"))
    axes[1].set(xlabel="step", ylabel="loss", title="per target modality", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
