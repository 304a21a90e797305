"""Run outputs: a JSONL metrics log (training and validation records) and a PNG of the loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


# Prefix of every key of a validation record besides ``step`` (``training/validation.py``).
VAL_PREFIX = "val/"


def is_validation_record(record: dict[str, Any]) -> bool:
    """Whether a metrics.jsonl record is a validation record (else a training step's)."""
    return f"{VAL_PREFIX}loss" in record


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
    """Plot the objective, then the smoothed loss of every 1D (CE) and 2D (MSE) target modality.

    Validation records (``val/...`` keys, ``training/validation.py``) are drawn on the same
    panels as dashed lines with markers, unsmoothed, in their training curve's colour.
    """
    from modus_mega.modalities import modality

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    val = [r for r in records if is_validation_record(r)]
    train = [r for r in records if not is_validation_record(r)]
    colours = {}  # training curve label -> its colour, for the validation points
    for key in ("loss", "ce", "mse"):
        (line,) = axes[0].plot([r["step"] for r in train], [r.get(key) for r in train], label=key)
        colours[key] = line.get_color()
    axes[0].set(title="objective")
    names = sorted({k.removeprefix("loss/") for r in train for k in r if k.startswith("loss/")})
    for name in names:
        xs, ys = zip(*[(r["step"], r[f"loss/{name}"]) for r in train if f"loss/{name}" in r])
        ax = axes[1] if modality(name).family == "1d" else axes[2]
        (line,) = ax.plot(xs, _smooth(list(ys)), label=name)
        colours[f"loss/{name}"] = line.get_color()
    for key in sorted({k.removeprefix(VAL_PREFIX) for r in val for k in r if k.startswith(VAL_PREFIX)}):
        xs, ys = zip(*[(r["step"], r[VAL_PREFIX + key]) for r in val if VAL_PREFIX + key in r])
        name = key.removeprefix("loss/")
        ax = axes[0] if key in ("loss", "ce", "mse") else axes[1] if modality(name).family == "1d" else axes[2]
        ax.plot(xs, ys, "o--", color=colours.get(key), label=f"val {name}")
    axes[1].set(title="1D targets: cross-entropy (smoothed; val: held-out)")
    axes[2].set(title="2D targets: flow-matching MSE (smoothed; val: held-out)")
    for ax in axes:
        ax.set(xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
