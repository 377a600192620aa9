"""Leaderboards for programs: one flat table, one row per run, as CSV or JSON.

Full precision (floats as Python writes them), empty CSV cells / JSON nulls for missing values, and
no title lines, so `pandas.read_csv` or `json.load` read it as it is. Breakdowns of the best run are
their own table (`--breakdown FIELD`). The ranking and breakdown maths are `leaderboard`'s.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.leaderboard import BREAKDOWN_COLUMNS, breakdown, collect, default_metric, differences, rank

Table = tuple[list[str], list[list[Any]]]



def _plain(value: Any) -> Any:
    """JSON-safe cell: NaN and infinities become None (missing), lists stay lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ranked(store: ExperimentStore, sweep: str | None, metric: str | None, mode: str) -> tuple[list[Any], str]:
    rows = collect(store, None if sweep in (None, "all") else sweep)
    if not rows:
        return [], ""
    metric = metric or default_metric(rows[0].task)
    if not any(metric in r.metrics for r in rows):
        metric = metric.replace("test/", "val/")  # e.g. trials stopped before testing
    return rank(rows, metric, mode), metric


def runs_table(store: ExperimentStore, sweep: str | None = None, metric: str | None = None,
               mode: str = "max") -> Table:
    """rank, identity, the configuration values that differ, seed, then every metric (ranking metric first)."""
    ranked, metric = _ranked(store, sweep, metric, mode)
    if not ranked:
        return ["rank", "run_id", "status", "sweep", "task", "model", "seed"], []
    keys = differences(ranked)
    metrics = sorted(set().union(*(r.metrics for r in ranked)) - {metric})
    header = ["rank", "run_id", "status", "sweep", "task", "model", *keys, "seed", metric, *metrics]
    table = [[i + 1, r.run_id, r.status, r.sweep, r.task, r.model, *(r.config.get(k) for k in keys), r.seed,
              r.metrics.get(metric), *(r.metrics.get(m) for m in metrics)] for i, r in enumerate(ranked)]
    return header, [[_plain(v) for v in row] for row in table]


def breakdown_table(store: ExperimentStore, by: str, sweep: str | None = None, metric: str | None = None,
                    mode: str = "max", split: str = "test") -> Table:
    """Deformation metrics per group of `by` for the best-ranked run (its run id on every row)."""
    ranked, _ = _ranked(store, sweep, metric, mode)
    header = ["run_id", by, *BREAKDOWN_COLUMNS]
    if not ranked:
        return header, []
    best = ranked[0].run_id
    groups = breakdown(store, best, by, split)
    return header, [[best, group, *(_plain(values.get(c)) for c in BREAKDOWN_COLUMNS)]
                    for group, values in sorted(groups.items())]


def to_csv(table: Table) -> str:
    header, rows = table
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v) for v in row]
                      for row in rows])
    return buffer.getvalue()


def to_json(table: Table) -> str:
    """A JSON array with one object per row."""
    header, rows = table
    return json.dumps([dict(zip(header, row)) for row in rows], indent=2)


def render(table: Table, fmt: str) -> str:
    if fmt == "csv":
        return to_csv(table).rstrip("\n")
    if fmt == "json":
        return to_json(table)
    raise ValueError(f"format {fmt!r}: tables for programs are csv or json")


def as_text(table: Table, fmt: str) -> str:
    """Any of the leaderboard's formats for an already built table (terminal and markdown from leaderboard)."""
    if fmt in ("csv", "json"):
        return render(table, fmt)
    from thalia_ray.store.leaderboard import render as render_text

    header, rows = table
    return render_text(header, rows, fmt)
