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
    """Every record of a JSONL log; a torn last line (a write cut off by a kill) is dropped.

    Any other line that does not parse raises ``ValueError`` naming the file and the line.
    """
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break  # the last write was cut off: the run logs that step again on resume
            raise ValueError(f"{path}:{number} is not a JSON record ({e}); fix or delete that line") from None
    return records


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average (per-modality losses are sparse and noisy)."""
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_loss_curves(records: list[dict[str, Any]], path: str | Path) -> None:
    """Plot the objective, then the smoothed loss of every 1D (CE) and 2D (MSE) target modality."""
    from modus_mega.modalities import modality

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    steps = [r["step"] for r in records]
    for key in ("loss", "ce", "mse"):
        axes[0].plot(steps, [r.get(key) for r in records], label=key)
    axes[0].set(title="objective")
    names = sorted({k.removeprefix("loss/") for r in records for k in r if k.startswith("loss/")})
    for name in names:
        points = [(r["step"], r[f"loss/{name}"]) for r in records if f"loss/{name}" in r]
        xs, ys = zip(*points)
        ax = axes[1] if modality(name).family == "1d" else axes[2]
        ax.plot(xs, _smooth(list(ys)), label=name)
    axes[1].set(title="1D targets: cross-entropy (smoothed)")
    axes[2].set(title="2D targets: flow-matching MSE (smoothed)")
    for ax in axes:
        ax.set(xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
