"""Markdown summaries of metrics JSON files, and the side-by-side comparison table.

Rows are metrics, columns are runs, every value in percent with two decimals; in the comparison
the best value of each metric row is in bold, judged on the rounded values shown (all metrics
are higher-is-better; ties are all bold; a row where every run ties has no bold; count rows
such as ``num_open`` are never bolded). A value that is absent or null shows as ``-``. Report
metrics are stored as fractions (``"units": "fraction"``) and shown x100 like the paper's tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import MedAlignError
from shared.records import read_json

# (block in the JSON, row-label prefix)
_BLOCKS: tuple[tuple[str, str], ...] = (
    ("llava_med", ""), ("medheval", ""), ("strict", "strict "), ("multiple_choice", "mc "),
    ("report", ""),
)
COUNT_KEYS = frozenset({"num_open", "num_close", "num_mc", "num_reports", "num_line_pairs",
                        "num_id_pairs"})


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, float | int | None]]:
    """Flatten a metrics JSON into ``[(row label, value)]`` in display order."""
    rows: list[tuple[str, float | int | None]] = []
    scale = 100.0 if metrics.get("units") == "fraction" else 1.0
    for block, prefix in _BLOCKS:
        values = metrics.get(block)
        if isinstance(values, dict):
            rows.extend((prefix + k, v if v is None or k in COUNT_KEYS else scale * v)
                        for k, v in values.items()
                        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
    for key in ("num_reports", "num_line_pairs", "num_id_pairs"):
        if key in metrics:
            rows.append((key, metrics[key]))
    return rows


def _fmt(value: float | int | None, count: bool) -> str:
    if value is None:
        return "-"
    return str(int(value)) if count else f"{value:.2f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def compare_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown table, rows = metrics (union over runs, first-seen order), columns = runs."""
    per_run = [dict(metric_rows(m)) for _, m in runs]
    labels: list[str] = []
    for rows in per_run:
        labels += [k for k in rows if k not in labels]
    body = []
    for label in labels:
        count = label.split(" ")[-1] in COUNT_KEYS
        shown = [_fmt(rows.get(label), count) for rows in per_run]
        # best judged on the shown (rounded) values; no bold when every run ties
        present = [float(s) for s in shown if s != "-"]
        best = max(present) if present and not count else None
        if best is not None and len(present) == len(shown) and min(present) == best:
            best = None
        cells = [f"**{s}**" if best is not None and s != "-" and float(s) == best else s
                 for s in shown]
        body.append([label] + cells)
    return _table(["metric"] + [name for name, _ in runs], body)


def markdown_summary(metrics: dict[str, Any], title: str = "Metrics") -> str:
    """One run's summary: a title, the inputs, a metric table and the notes/warnings."""
    lines = [f"# {title}", ""]
    for key in ("task", "pred", "gt"):
        if key in metrics:
            lines.append(f"- {key}: `{metrics[key]}`")
    if metrics.get("missing_ids"):
        lines.append(f"- missing predictions: {len(metrics['missing_ids'])} (scored as empty answers)")
    if metrics.get("extra_ids"):
        lines.append(f"- predictions without ground truth (ignored): {len(metrics['extra_ids'])}")
    lines.append("")
    rows = metric_rows(metrics)
    body = [[k, _fmt(v, k.split(" ")[-1] in COUNT_KEYS)] for k, v in rows]
    lines.append(_table(["metric", "value (%)"], body))
    for note in metrics.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def run_name(path: str | Path) -> str:
    """Default column name: the file stem, or the parent folder for a generic ``metrics.json``."""
    p = Path(path)
    return p.parent.name if p.stem in ("metrics", "results", "scores") and p.parent.name else p.stem


def load_metrics(path: str | Path) -> dict[str, Any]:
    """Read a metrics JSON written by ``medalign-eval score``."""
    data = read_json(path)
    if not isinstance(data, dict) or not metric_rows(data):
        raise MedAlignError(f"{path}: not a metrics file from 'medalign-eval score' "
                            "(no llava_med/medheval/strict/report block)")
    return data
