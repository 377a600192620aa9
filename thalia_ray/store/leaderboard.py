"""Leaderboards over stored runs: ranking, what differs between configurations, seeds, breakdowns.

Everything is computed from the experiment store alone (configs, results, per-sample predictions), so a
leaderboard can be rebuilt at any time, on any machine that can read the store.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from thalia_ray.config import ThaliaConfig
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import StoreError

# Paths that never distinguish one configuration from another in a comparison.
_IGNORED = ("name", "seed", "storage.", "runtime.", "sweep")
BREAKDOWNS = ("frame_id", "volcano", "intensity", "activity_type")
BREAKDOWN_COLUMNS = ("n", "n_deformation", "recall", "false_alarms", "ap")


def default_metric(task: str) -> str:
    return "test/f1_deformation" if task == "classification" else "test/iou_deformation"


@dataclass
class Row:
    run_id: str
    status: str
    task: str
    model: str
    seed: int
    config: dict[str, Any]  # flattened, dotted paths
    metrics: dict[str, float]
    sweep: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def collect(store: ExperimentStore, sweep: str | None = None) -> list[Row]:
    """Runs with final results (finished, or stopped early with a best checkpoint evaluated)."""
    rows = []
    for summary in store.list_runs(sweep=sweep):
        record = store.run(summary.run_id)
        try:
            results, cfg, history = record.read_results(), record.read_config(), record.read_history()
        except StoreError:  # damaged: `runs list` shows it as unreadable
            continue
        metrics = dict((results or {}).get("metrics", {}))
        if not metrics and history:  # a trial stopped by the scheduler: its best validation epoch
            metrics = {k: v for k, v in history[-1].items() if k.startswith("val/")}
        if not metrics:
            continue
        rows.append(Row(summary.run_id, summary.status, cfg.model.task, cfg.model.name or "?", cfg.seed,
                        flatten(cfg.model_dump(mode="json")), metrics, summary.sweep))
    return rows


def differences(rows: list[Row]) -> list[str]:
    """Configuration paths whose values differ between the rows (the ones worth showing)."""
    if len(rows) < 2:
        return []
    paths = sorted(set().union(*(r.config for r in rows)))
    return [p for p in paths if not p.startswith(_IGNORED)
            and len({repr(r.config.get(p)) for r in rows}) > 1]


def rank(rows: list[Row], metric: str, mode: str = "max") -> list[Row]:
    """Best first; runs without the metric go last."""
    def key(row: Row) -> float:
        value = row.metrics.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return -value if mode == "max" else value

    return sorted(rows, key=key)


def seed_groups(rows: list[Row], keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    """Mean ± standard deviation of each metric over runs that differ only by seed."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.config.get(k)) for k in keys), []).append(row)
    out = []
    for members in groups.values():
        entry: dict[str, Any] = {k: members[0].config.get(k) for k in keys}
        entry["seeds"] = sorted(r.seed for r in members)
        for metric in metrics:
            values = [r.metrics[metric] for r in members if isinstance(r.metrics.get(metric), (int, float))]
            entry[metric] = (statistics.fmean(values) if values else math.nan,
                             statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def breakdown(store: ExperimentStore, run_id: str, by: str, split: str = "test") -> dict[str, dict[str, float]]:
    """Deformation metrics per subgroup from stored predictions (see `metrics.subgroup_metrics`).

    `by` is a prediction column (frame_id, intensity, activity_type) or `volcano`: the volcano names of
    each sample's frame, from the run's dataset root `frame_names.json` (none: no breakdown). A frame
    names every volcano it covers, so its samples count for each of them.
    """
    from thalia_ray.data.annotations import load_frame_names
    from thalia_ray.metrics import subgroup_metrics

    record = store.run(run_id)
    rows = record.read_predictions(split)
    if not rows:
        return {}
    if by == "volcano":
        cfg = record.read_config()
        names = load_frame_names(cfg.data.root, cfg.storage)
        memberships = [names.get(r["frame_id"], []) for r in rows]
    else:
        memberships = [[r[by]] for r in rows]
    column = lambda name: np.asarray([r[name] for r in rows])  # noqa: E731
    return subgroup_metrics(memberships, column("pred"), column("label"), column("score"))


# ------------------------------------------------------------------------------------- rendering
def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        mean, spread = value
        return "—" if math.isnan(mean) else f"{mean:.3f} ± {spread:.3f}"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2g}"  # learning rates
    return "—" if value is None else str(value)


def render(header: list[str], table: list[list[Any]], fmt: str) -> str:
    cells = [[_cell(v) for v in row] for row in table]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(cells)
        return buffer.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def _metric_columns(rows: list[Row], metric: str) -> list[str]:
    """The headline metric first, then the other Deformation metrics present in every row."""
    common = set.intersection(*(set(r.metrics) for r in rows)) if rows else set()
    others = sorted(m for m in common if m.endswith("_deformation") and m != metric
                    and m.split("/")[0] in ("test", "val"))
    return [metric, *others][:7]


def leaderboard_text(store: ExperimentStore, sweep: str | None = None, fmt: str = "terminal",
                     metric: str | None = None, mode: str = "max", breakdown_by: Iterable[str] = BREAKDOWNS) -> str:
    rows = collect(store, None if sweep in (None, "all") else sweep)
    if not rows:
        return f"no runs with results in {store.root.url}" + (f" for sweep {sweep}" if sweep else "")
    metric = metric or default_metric(rows[0].task)
    if not any(metric in r.metrics for r in rows):
        metric = metric.replace("test/", "val/")  # e.g. trials stopped before testing
    ranked = rank(rows, metric, mode)
    keys = differences(ranked)
    metrics = _metric_columns(ranked, metric)
    header = ["#", "run", "status", "model", *keys, "seed", *metrics]
    table = [[i + 1, r.run_id, r.status, r.model, *(r.config.get(k) for k in keys), r.seed,
              *(r.metrics.get(m) for m in metrics)] for i, r in enumerate(ranked)]
    parts = [f"ranked by {metric} ({mode})", render(header, table, fmt)]
    if len({r.seed for r in ranked}) > 1:
        grouped = sorted(seed_groups(ranked, keys, metrics), key=lambda e: -e[metric][0]
                         if mode == "max" else e[metric][0])
        parts += ["\nmean ± std over seeds",
                  render([*keys, "seeds", *metrics], [[*(e[k] for k in keys), e["seeds"], *(e[m] for m in metrics)]
                                                      for e in grouped], fmt)]
    best = ranked[0]
    for by in breakdown_by:
        try:
            groups = breakdown(store, best.run_id, by)
        except StoreError:
            break  # no test predictions (e.g. a trial stopped early): no breakdowns
        if groups:
            parts += [f"\nbest run {best.run_id}: Deformation by {by} (recall, false alarms at the run's "
                      "threshold; AP of the group's positives against all negatives)",
                      render([by, *BREAKDOWN_COLUMNS],
                             [[g, *(v[c] for c in BREAKDOWN_COLUMNS)] for g, v in sorted(groups.items())], fmt)]
    return "\n".join(parts)


def best_config(store: ExperimentStore, sweep: str | None = None, metric: str | None = None,
                mode: str = "max") -> ThaliaConfig:
    """The best run's configuration, ready to train (no sweep section, the run's own seed)."""
    rows = collect(store, None if sweep in (None, "all") else sweep)
    if not rows:
        raise StoreError(f"no runs with results in {store.root.url}")
    metric = metric or default_metric(rows[0].task)
    if not any(metric in r.metrics for r in rows):
        metric = metric.replace("test/", "val/")
    best = rank(rows, metric, mode)[0]
    cfg = store.run(best.run_id).read_config()
    return cfg.model_copy(update={"sweep": None, "name": f"{cfg.name}-best"})
