"""Leaderboards over stored runs: runs chosen on validation, what differs between configurations, seeds,
breakdowns; as tables for people and for programs. It sits above both the store, which it reads, and
`metrics`, which computes the subgroup breakdowns (docs/architecture.md).

A run is ranked by a validation metric at its best epoch, exactly as Tune ranks a sweep's trials: the
sweep's own Tune metric for a sweep, else `--metric`, else the task's default (`val/f1_deformation`
for classifiers, `val/iou_deformation` for segmenters). Test metrics are shown beside it and never
choose anything (a test metric is refused as a ranking metric), so a reported test number stays an
honest estimate. Runs of different tasks are never ranked together: each task is its own ranking.

Everything is computed from the experiment store alone (configs, histories, results, per-sample
predictions), so a leaderboard can be rebuilt at any time, on any machine that can read the store.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from thalia_ray.config import ConfigError, ThaliaConfig, flatten
from thalia_ray.metric_names import AP, AUROC, F1, HEADLINE, LOSS, PRECISION, RECALL, TEST, VAL, key
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import StoreError, evaluated
from thalia_ray.tables import Table, render_all

# Paths that never distinguish one configuration from another in a comparison.
_IGNORED = ("name", "seed", "storage.", "runtime.", "sweep")
BREAKDOWNS = ("frame_id", "volcano", "intensity", "activity_type")
BREAKDOWN_COLUMNS = ("n", "n_deformation", "recall", "false_alarms", "ap")
VALIDATION = f"{VAL}/"
SHOWN_TEST_METRICS = 4  # test columns of a leaderboard for people (programs get every metric)
TEST_COLUMNS = (AUROC, AP, F1, PRECISION, RECALL)


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
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Selection:
    """What runs are chosen on: a validation metric, its direction, and why that one (named in output)."""

    metric: str
    mode: str  # "max" or "min"
    source: str  # e.g. "the Tune metric of sweep S"

    def __post_init__(self) -> None:
        if not self.metric.startswith(VALIDATION):
            raise ConfigError(f"ranking metric {self.metric!r}: runs are chosen on validation metrics only "
                              f"({VALIDATION}...); choosing on test data would make every test number optimistic")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"ranking mode {self.mode!r}: max or min")

    @classmethod
    def default(cls, task: str) -> "Selection":
        if task in HEADLINE:
            return cls(key(VAL, HEADLINE[task]), "max", f"the default for {task}")
        return cls(key(VAL, LOSS), "min", f"the default for {task} runs")

    @classmethod
    def given(cls, metric: str, mode: str | None) -> "Selection":
        """`--metric` (and `--mode`: default min for a loss, else max)."""
        return cls(metric, mode or ("min" if metric.endswith("loss") else "max"), "given with --metric")

    def value(self, history: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> float | None:
        """The run's best value of the metric over its epochs (Tune's rule for trials); without a
        history, its results' value; None when it has none."""
        values = [float(h[self.metric]) for h in history if _finite(h.get(self.metric))]
        if values:
            return max(values) if self.mode == "max" else min(values)
        return float(metrics[self.metric]) if _finite(metrics.get(self.metric)) else None

    def order(self, value: float | None) -> float:
        """Sort key: best first, runs without the metric last."""
        if value is None:
            return math.inf
        return -value if self.mode == "max" else value

    def describe(self) -> str:
        return (f"ranked by {self.metric} ({self.mode}; each run's best epoch; {self.source}); "
                "test metrics are shown, never used to rank")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Ranking:
    """The runs of one task, best first, with the value each was ranked by."""

    task: str
    selection: Selection
    rows: list[Row]
    values: list[float | None]

    @property
    def best(self) -> Row:
        return self.rows[0]


def collect(store: ExperimentStore, sweep: str | None = None) -> list[Row]:
    """Runs with metrics: finished ones (results), and trials stopped by the scheduler (their epochs);
    pretraining runs, which have no task metric to rank by, are left out."""
    rows = []
    for summary in store.list_runs(sweep=sweep):
        if summary.kind == "pretrain":
            continue
        record = store.run(summary.run_id)
        try:
            results, cfg, history = record.read_results(), record.read_config(), record.read_history()
        except StoreError:  # damaged: `runs list` shows it as unreadable
            continue
        metrics = dict((results or {}).get("metrics", {}))
        if not metrics and history:  # a trial stopped by the scheduler: its last epoch's validation
            metrics = {k: v for k, v in history[-1].items() if k.startswith(VALIDATION)}
        if not metrics:
            continue
        rows.append(Row(summary.run_id, summary.status, cfg.model.task, cfg.model.name or "?", cfg.seed,
                        flatten(cfg.model_dump(mode="json")), metrics, summary.sweep, history))
    return rows


def differences(rows: list[Row]) -> list[str]:
    """Configuration paths whose values differ between the rows (the ones worth showing)."""
    if len(rows) < 2:
        return []
    paths = sorted(set().union(*(r.config for r in rows)))
    return [p for p in paths if not p.startswith(_IGNORED)
            and len({repr(r.config.get(p)) for r in rows}) > 1]


def sweep_selection(store: ExperimentStore, sweep_id: str) -> Selection | None:
    """The Tune metric a sweep ranked its trials by: from its summary, or (still running) its config."""
    record = store.sweep(sweep_id)
    source = f"the Tune metric of sweep {sweep_id}"
    if record.loc.join("summary.json").exists():
        summary = record.read_summary()
        if summary.get("metric"):
            return Selection(summary["metric"], summary.get("mode", "max"), source)
    cfg = record.read_config()
    return Selection(cfg.sweep.metric, cfg.sweep.mode, source) if cfg is not None and cfg.sweep else None


def rank(rows: list[Row], selection: Selection) -> Ranking:
    """Rows of one task, best first by `selection`; runs without the metric go last."""
    valued = sorted(((selection.value(r.history, r.metrics), r) for r in rows),
                    key=lambda pair: selection.order(pair[0]))
    task = rows[0].task if rows else "?"
    return Ranking(task, selection, [r for _, r in valued], [v for v, _ in valued])


def rankings(store: ExperimentStore, sweep: str | None = None, metric: str | None = None, mode: str | None = None,
             task: str | None = None) -> list[Ranking]:
    """One ranking per task (classification, then segmentation, then any other) of the store's runs,
    or of one sweep's trials (`sweep` None or "all": every run), optionally of one `task` only."""
    if mode and not metric:
        raise ConfigError(f"--mode {mode} needs --metric: the default metrics are ranked in their own direction")
    sweep = None if sweep in (None, "all") else sweep
    rows = [r for r in collect(store, sweep) if task is None or r.task == task]
    chosen = Selection.given(metric, mode) if metric else (sweep_selection(store, sweep) if sweep else None)
    reported = {k for r in rows for k in [*r.metrics, *(k for h in r.history for k in h)] if k.startswith(VALIDATION)}
    if metric and rows and metric not in reported:  # a mistyped metric ranks nothing: say so, never an arbitrary order
        raise ConfigError(f"--metric {metric}: no run reports it; they report {', '.join(sorted(reported)) or 'none'}")
    tasks = sorted({r.task for r in rows}, key=lambda t: (list(HEADLINE).index(t) if t in HEADLINE else len(HEADLINE), t))
    return [rank([r for r in rows if r.task == t], chosen or Selection.default(t)) for t in tasks]


def best_run(store: ExperimentStore, sweep: str | None = None, metric: str | None = None, mode: str | None = None,
             task: str | None = None) -> tuple[Row, Selection]:
    """The one best run by validation; an error when there is none, or runs of several tasks to choose from."""
    found = rankings(store, sweep, metric, mode, task)
    where = f"{store.root.url}" + (f" for sweep {sweep}" if sweep not in (None, "all") else "")
    if not found:
        raise StoreError(f"no runs with results in {where}")
    if len(found) > 1:
        counts = ", ".join(f"{r.task}: {len(r.rows)}" for r in found)
        raise ConfigError(f"runs of {len(found)} tasks in {where} ({counts}) are never ranked together: "
                          "choose one with --task")
    ranking = found[0]
    if ranking.values[0] is None:
        raise StoreError(f"no run in {where} has {ranking.selection.metric} to be chosen on")
    return ranking.best, ranking.selection


def best_config(store: ExperimentStore, sweep: str | None = None, metric: str | None = None,
                mode: str | None = None, task: str | None = None) -> ThaliaConfig:
    """The best run's configuration, ready to train (no sweep section, the run's own seed)."""
    best, _ = best_run(store, sweep, metric, mode, task)
    cfg = store.run(best.run_id).read_config()
    return cfg.model_copy(update={"sweep": None, "name": f"{cfg.name}-best"})


def seed_groups(rows: list[Row], keys: list[str], columns: Mapping[str, Callable[[Row], Any]]) -> list[dict[str, Any]]:
    """Mean ± standard deviation of each column's values over runs that differ only by seed."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.config.get(k)) for k in keys), []).append(row)
    out = []
    for members in groups.values():
        entry: dict[str, Any] = {k: members[0].config.get(k) for k in keys}
        entry["seeds"] = sorted(r.seed for r in members)
        for name, value_of in columns.items():
            values = [value_of(r) for r in members if _finite(value_of(r))]
            entry[name] = (statistics.fmean(values) if values else math.nan,
                           statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def breakdown(store: ExperimentStore, run_id: str, by: str, split: str = "test") -> dict[str, dict[str, float]]:
    """Deformation metrics per subgroup from stored predictions (see `metrics.subgroup_metrics`).

    `by` is a prediction column (frame_id, intensity, activity_type) or `volcano`: the volcano names of
    each sample's frame, from the run's dataset root `frame_names.json` (none: no breakdown). A frame
    names every volcano it covers, so its samples count for each of them.
    """
    from thalia_ray.data.annotations import load_frame_names  # torch only when a breakdown is asked for
    from thalia_ray.metrics import subgroup_metrics
    from thalia_ray.storage import S3Options, resolve

    record = store.run(run_id)
    rows = record.read_predictions(split)
    if not rows:
        return {}
    if by == "volcano":
        cfg = record.read_config()
        names = load_frame_names(resolve(cfg.data.root, S3Options.of(cfg.storage)))
        memberships = [names.get(r["frame_id"], []) for r in rows]
    else:
        memberships = [[r[by]] for r in rows]
    column = lambda name: np.asarray([r[name] for r in rows])  # noqa: E731
    return subgroup_metrics(memberships, column("pred"), column("label"), column("score"))


# ------------------------------------------------------------------------------------- for people
def _short(metric: str) -> str:
    """`test/f1_deformation` → `test f1`: every leaderboard metric is the Deformation class's."""
    return metric.replace("/", " ").removesuffix("_deformation")


def _test_columns(ranking: Ranking) -> list[str]:
    """The task's headline test metric, then the first of TEST_COLUMNS that any run has."""
    present = set().union(*(r.metrics for r in ranking.rows))
    wanted = [key(TEST, HEADLINE.get(ranking.task, "")), *(key(TEST, m) for m in TEST_COLUMNS)]
    return [m for m in dict.fromkeys(wanted) if m in present][:SHOWN_TEST_METRICS]


def evaluated_cell(metrics: Mapping[str, Any], split: str = "test") -> str | None:
    """`N/M` (the leaderboard's `evaluated` column): of the M samples of `split`, the N its metrics cover (fewer when samples were skipped as
    unreadable or left out); None for runs that did not record it."""
    counts = evaluated(metrics, split)
    return None if counts is None else f"{counts[0]}/{counts[1]}"


def ranking_tables(store: ExperimentStore, ranking: Ranking, breakdown_by: Iterable[str] = BREAKDOWNS) -> list[Table]:
    """A task's ranking for people: the runs, the spread over seeds when seeds vary, the best run's breakdowns."""
    rows, selection = ranking.rows, ranking.selection
    keys = differences(rows)
    shown = [k for k in keys if k != "model.name"]  # the model column shows it
    ranked = dict(zip((r.run_id for r in rows), ranking.values))
    columns: dict[str, Callable[[Row], Any]] = {f"best {_short(selection.metric)}": lambda r: ranked[r.run_id]}
    columns.update({_short(m): (lambda r, m=m: r.metrics.get(m)) for m in _test_columns(ranking)})
    title = f"{ranking.task}: {len(rows)} runs {selection.describe()}; metrics of the Deformation class"
    tables = [Table(["#", "run", "status", "model", *shown, "seed", *columns, "evaluated"],
                    [[i + 1, r.run_id, r.status, r.model, *(r.config.get(k) for k in shown), r.seed,
                      *(value_of(r) for value_of in columns.values()), evaluated_cell(r.metrics)]
                     for i, r in enumerate(rows)], title)]
    if len({r.seed for r in rows}) > 1:
        chosen = next(iter(columns))
        grouped = sorted(seed_groups(rows, keys, columns),
                         key=lambda e: selection.order(None if math.isnan(e[chosen][0]) else e[chosen][0]))
        tables.append(Table([*keys, "seeds", *columns],
                            [[*(e[k] for k in keys), e["seeds"], *(e[c] for c in columns)] for e in grouped],
                            f"{ranking.task}: mean ± std over seeds"))
    best = ranking.best
    for by in breakdown_by:
        try:
            groups = breakdown(store, best.run_id, by)
        except StoreError:
            break  # no test predictions (e.g. a trial stopped early): no breakdowns
        if groups:
            tables.append(Table([by, *BREAKDOWN_COLUMNS],
                                [[g, *(v[c] for c in BREAKDOWN_COLUMNS)] for g, v in sorted(groups.items())],
                                f"best {ranking.task} run {best.run_id}: Deformation by {by} (recall, false alarms "
                                "at the run's threshold; AP of the group's positives against all negatives)"))
    return tables


def leaderboard_text(store: ExperimentStore, sweep: str | None = None, fmt: str = "terminal", metric: str | None = None,
                     mode: str | None = None, task: str | None = None, breakdown_by: Iterable[str] = BREAKDOWNS) -> str:
    """The leaderboard for people (terminal or markdown): one ranking per task, each under its title."""
    found = rankings(store, sweep, metric, mode, task)
    if not found:
        return f"no runs with results in {store.root.url}" + (f" for sweep {sweep}" if sweep not in (None, "all") else "")
    return render_all([t for ranking in found for t in ranking_tables(store, ranking, tuple(breakdown_by))], fmt)


# ------------------------------------------------------------------------------------- for programs
def runs_table(store: ExperimentStore, sweep: str | None = None, metric: str | None = None, mode: str | None = None,
               task: str | None = None) -> Table:
    """One row per run, grouped by task and ranked within it: rank, identity, the configuration values
    that differ, seed, what it was ranked by and the value, then every metric."""
    found = rankings(store, sweep, metric, mode, task)
    rows = [r for ranking in found for r in ranking.rows]
    keys = differences(rows)
    metrics = sorted(set().union(*(r.metrics for r in rows))) if rows else []
    header = ["rank", "task", "run_id", "status", "sweep", "model", *keys, "seed", "ranked_by", "ranked_value", *metrics]
    table = [[i + 1, r.task, r.run_id, r.status, r.sweep, r.model, *(r.config.get(k) for k in keys), r.seed,
              f"{ranking.selection.metric} ({ranking.selection.mode})", value, *(r.metrics.get(m) for m in metrics)]
             for ranking in found for i, (r, value) in enumerate(zip(ranking.rows, ranking.values))]
    return Table(header, table)


def breakdown_table(store: ExperimentStore, by: str, sweep: str | None = None, metric: str | None = None,
                    mode: str | None = None, task: str | None = None, split: str = "test") -> Table:
    """Deformation metrics per group of `by` for the best run of each task (its run id on every row)."""
    rows = []
    for ranking in rankings(store, sweep, metric, mode, task):
        best = ranking.best.run_id
        rows += [[best, group, *(values.get(c) for c in BREAKDOWN_COLUMNS)]
                 for group, values in sorted(breakdown(store, best, by, split).items())]
    return Table(["run_id", by, *BREAKDOWN_COLUMNS], rows)
