"""Write a suite's results: ``results.json``, ``results.md`` (the grid as a table) and ``heatmap.png``.

The table and the heatmap show each direction's headline metric (``eval/scoring.py``), sources
as rows and targets as columns, in the modality table's order; a chained direction
(``rgb:depth:normal``) is a row of its own named by its steps before the target. The heatmap's
colour is the value over the metric's best value (percentages over 100), so every cell reads
0 (bad) to 1 (perfect); empty cells are directions not run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: files only, no backend or window state

from modus_mega.eval.runner import DirectionResult, SuiteResults
from modus_mega.modalities import modality_names

RESULTS_JSON, TABLE_MD, HEATMAP_PNG = "results.json", "results.md", "heatmap.png"


def _row_name(result: DirectionResult) -> str:
    return result.direction.rsplit(":", 1)[0]


def _axes(results: SuiteResults) -> tuple[list[str], list[str]]:
    order = {n: i for i, n in enumerate(modality_names())}
    rows = sorted({_row_name(r) for r in results.directions}, key=lambda r: (r.count(":"), [order.get(n, -1) for n in r.split(":")]))
    cols = sorted({r.target for r in results.directions}, key=order.__getitem__)
    return rows, cols


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def markdown_table(results: SuiteResults) -> str:
    """The grid as a markdown table: one row per source, one column per target (its headline metric)."""
    rows, cols = _axes(results)
    by_cell = {(_row_name(r), r.target): r for r in results.directions}
    headline = {r.target: r.headline for r in results.directions}
    lines = [
        f"{results.model} on {results.suite} ({results.num_scenes} scenes)",
        "",
        "| source \\ target | " + " | ".join(f"{c} ({headline[c]})" for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row in rows:
        cells = [_cell(by_cell[(row, c)].value) if (row, c) in by_cell else "" for c in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(results: SuiteResults, path: Path) -> None:
    """A PNG of the grid: colour = headline / best value, each cell annotated with its value."""
    rows, cols = _axes(results)
    grid = np.full((len(rows), len(cols)), np.nan)
    labels = [["" for _ in cols] for _ in rows]
    for r in results.directions:
        i, j = rows.index(_row_name(r)), cols.index(r.target)
        grid[i, j] = r.value / r.full_scale
        labels[i][j] = _cell(r.value)
    fig = Figure(figsize=(1.0 + 0.8 * max(len(cols), 2), 1.0 + 0.45 * max(len(rows), 2)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(labels):
        for j, text in enumerate(row):
            if text:
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title(f"{results.model} on {results.suite} ({results.num_scenes} scenes)", fontsize=9)
    fig.colorbar(image, ax=ax, label="headline / best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(results: SuiteResults, out: str | Path) -> dict[str, Path]:
    """Write the three files into ``out`` (created); returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "table": out / TABLE_MD, "heatmap": out / HEATMAP_PNG}
    paths["json"].write_text(json.dumps(results.to_json(), indent=2) + "\n")
    paths["table"].write_text(markdown_table(results))
    heatmap(results, paths["heatmap"])
    return paths


# ----------------------------------------------------------------------------- ablations


def _column(result: DirectionResult, by_target: bool) -> str:
    return f"{result.target} ({result.headline})" if by_target else f"{result.direction} ({result.headline})"


def variant_table(name: str, variants: dict[str, SuiteResults], by_target: bool = False) -> str:
    """An ablation as a markdown table: one row per variant, one column per direction (or target)."""
    columns = list(dict.fromkeys(_column(r, by_target) for v in variants.values() for r in v.directions))
    first = next(iter(variants.values()))
    lines = [
        f"ablation {name}: {first.model} on {first.suite} ({first.num_scenes} scenes)",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for variant, results in variants.items():
        cells = {_column(r, by_target): _cell(r.value) for r in results.directions}
        lines.append(f"| {variant} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_variants(name: str, variants: dict[str, SuiteResults], out: str | Path, by_target: bool = False) -> list[Path]:
    """``ablation.json`` (each variant's results) and ``ablation.md`` in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "ablation.json", out / "ablation.md"]
    record = {"ablation": name, "variants": {k: v.to_json() for k, v in variants.items()}}
    paths[0].write_text(json.dumps(record, indent=2) + "\n")
    paths[1].write_text(variant_table(name, variants, by_target))
    return paths


def steps_plot(variants: dict[str, SuiteResults], out: str | Path) -> Path:
    """``steps.png``: each direction's headline (over its best value) against the number of flow steps (log x)."""
    steps = [int(k) for k in variants]
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    first = next(iter(variants.values()))
    for index, row in enumerate(first.directions):
        values = [v.directions[index].value / row.full_scale for v in variants.values()]
        ax.plot(steps, values, marker="o", label=f"{row.direction} ({row.headline})")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("flow steps")
    ax.set_ylabel("headline / best")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=7)
    ax.set_title(f"quality vs flow steps ({first.num_scenes} scenes)", fontsize=9)
    fig.tight_layout()
    path = Path(out) / "steps.png"
    fig.savefig(path, dpi=120)
    return path
