"""The side-by-side report of ``scripts/eval.sh``: one markdown table and one picture from lm-eval's JSON.

Every number in the table is read from the results JSON lm-eval wrote for each model (the
``results`` block: ``"METRIC,FILTER"`` and ``"METRIC_stderr,FILTER"``), rounded to 4 decimals;
the first model is the baseline and each other one gets a difference column. The picture shows
the same rows as bars, one colour per model, with the stderr as error bars.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

Row = tuple[str, str]  # (task, "METRIC,FILTER")


def read_results(path: str | Path) -> dict[str, dict]:
    """``results`` of an lm-eval results JSON: task -> {"METRIC,FILTER": value, ...}."""
    return json.loads(Path(path).read_text())["results"]


def metric_rows(results: dict[str, dict]) -> list[Row]:
    """Every (task, metric) with a number, in lm-eval's order; stderr entries and aliases are not rows.

    >>> metric_rows({"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.4}})
    [('arc_easy', 'acc,none'), ('arc_easy', 'acc_norm,none')]
    """
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if "," in key and not name.endswith("_stderr") and isinstance(value, (int, float)):
                rows.append((task, key))
    return rows


def metric_label(key: str) -> str:
    """``acc,none`` -> ``acc``; ``exact_match,strict-match`` -> ``exact_match (strict-match)``."""
    name, _, filter_name = key.partition(",")
    return name if filter_name in ("", "none") else f"{name} ({filter_name})"


def value(results: dict[str, dict], row: Row) -> float | None:
    got = results.get(row[0], {}).get(row[1])
    return float(got) if isinstance(got, (int, float)) else None


def stderr(results: dict[str, dict], row: Row) -> float | None:
    name, _, filter_name = row[1].partition(",")
    got = results.get(row[0], {}).get(f"{name}_stderr,{filter_name}")
    return float(got) if isinstance(got, (int, float)) and math.isfinite(got) else None


def fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def all_rows(tables: Sequence[dict[str, dict]]) -> list[Row]:
    rows: list[Row] = []
    for results in tables:
        rows += [row for row in metric_rows(results) if row not in rows]
    return rows


def markdown_table(labels: Sequence[str], tables: Sequence[dict[str, dict]]) -> str:
    """task | metric | one column per model | each model minus the first | stderr of each."""
    base = labels[0]
    header = ["task", "metric", *labels, *(f"{label} − {base}" for label in labels[1:]),
              "stderr (" + " / ".join(labels) + ")"]
    lines = ["| " + " | ".join(header) + " |", "|:--|:--|" + "--:|" * (len(header) - 2)]
    for row in all_rows(tables):
        values = [value(t, row) for t in tables]
        diffs = [v - values[0] if v is not None and values[0] is not None else None for v in values[1:]]
        errors = " / ".join(fmt(e) if (e := stderr(t, row)) is None else f"±{fmt(e)}" for t in tables)
        cells = [row[0], metric_label(row[1]), *map(fmt, values), *(fmt(d, signed=True) for d in diffs), errors]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_line(labels: Sequence[str], tables: Sequence[dict[str, dict]]) -> str:
    """The mean over the rows every model has (OpenLLaMA's README averages its table's rows)."""
    rows = [row for row in all_rows(tables) if all(value(t, row) is not None for t in tables)]
    if not rows:
        return ""
    means = [sum(value(t, row) for row in rows) / len(rows) for t in tables]
    pairs = zip(labels, means, strict=True)
    return f"Mean of the {len(rows)} rows: " + ", ".join(f"{label} {m:.4f}" for label, m in pairs)


def plot(labels: Sequence[str], tables: Sequence[dict[str, dict]], path: Path) -> None:
    """Per-row bars, one colour per model, stderr as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = all_rows(tables)
    width = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * len(tables) + 2), 4.5))
    for i, (label, results) in enumerate(zip(labels, tables, strict=True)):
        xs = [r + (i - (len(tables) - 1) / 2) * width for r in range(len(rows))]
        heights = [value(results, row) or 0.0 for row in rows]
        errors = [stderr(results, row) or 0.0 for row in rows]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{task}\n{metric_label(key)}" for task, key in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title("lm-eval: " + " vs ".join(labels))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: Sequence[tuple[str, Path]], out_dir: Path) -> str:
    """``report.md`` (the models, their JSON files, the table) and ``report.png``; returns the table."""
    labels = [label for label, _ in runs]
    tables = [read_results(path) for _, path in runs]
    table = markdown_table(labels, tables)
    mean = mean_line(labels, tables)
    sources = "\n".join(f"- {label}: `{path.relative_to(out_dir)}`" for label, path in runs)
    (out_dir / "report.md").write_text(
        f"# lm-eval results\n\nlm-eval's results JSON of each model:\n\n{sources}\n\n{table}\n\n{mean}\n\n"
        "![per-task scores](report.png)\n")
    plot(labels, tables, out_dir / "report.png")
    return f"{table}\n{mean}" if mean else table
