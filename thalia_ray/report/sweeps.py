"""The report's sections for a sweep: its trials ranked on the sweep's own validation metric (the
leaderboard's rule, so the page, the leaderboard and the demo name the same best trial), what the
scheduler stopped and when, what was swept and what was held constant, then the best trial's page.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from thalia_ray.report.html import image, note, section, table
from thalia_ray.report.runs import run_sections
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.leaderboard import collect, differences, sweep_selection
from thalia_ray.metric_names import HEADLINE, TEST, key
from thalia_ray.store.records import StoreError

LOG_SCALE = ("train.lr", "train.weight_decay")  # scale parameters: compared by their ratios


def sweep_sections(store: ExperimentStore, sweep_id: str) -> list[str]:
    from thalia_ray.report import figures

    record = store.sweep(sweep_id)
    summary = record.read_summary()
    trials = summary.get("trials", [])
    selection = sweep_selection(store, sweep_id)
    if selection is None:
        raise StoreError(f"sweep {sweep_id} names no metric in its summary or configuration ({record.loc})")
    runs = {t["run_id"]: store.run(t["run_id"]) for t in trials}
    histories = {run_id: run.read_history() for run_id, run in runs.items()}
    metrics = {run_id: (run.read_results() or {}).get("metrics", {}) for run_id, run in runs.items()}
    values = {run_id: selection.value(histories[run_id], metrics[run_id]) for run_id in runs}
    ranked = sorted(trials, key=lambda t: selection.order(values[t["run_id"]]))
    paths = sorted({p for t in trials for p in t.get("config", {})})
    swept = [p for p in paths if len({repr(t.get("config", {}).get(p)) for t in trials}) > 1]
    held = ", ".join(f"{p} = {trials[0]['config'].get(p)}" for p in paths if p not in swept)
    cfg = record.read_config()
    test = key(TEST, HEADLINE[cfg.model.task if cfg is not None else "classification"])
    best = ranked[0]["run_id"] if ranked and values[ranked[0]["run_id"]] is not None else None
    overview = table(["field", "value"], [
        ("sweep", sweep_id), ("status", summary.get("status")),
        ("ranked by", f"{selection.metric} ({selection.mode}; each trial's best epoch; {selection.source})"),
        ("trials", len(trials)), ("stopped by the scheduler", sum(t.get("status") == "stopped" for t in trials)),
        ("best trial", best), (f"its best {selection.metric}", values.get(best) if best else None),
        ("held constant", held or None), ("wall seconds", summary.get("seconds")),
        ("worker seconds", summary.get("worker_seconds"))])
    labels = {run_id: run_id.removeprefix(f"{sweep_id}-") for run_id in runs}
    ranking = table(
        ["#", "trial", "status", "epochs", f"best {selection.metric}", f"{test} (not used to rank)", *swept],
        [(i + 1, labels[t["run_id"]], _trial_status(t), t.get("epochs"), values[t["run_id"]], metrics[t["run_id"]].get(test),
          *(t.get("config", {}).get(p) for p in swept)) for i, t in enumerate(ranked)],
        ["stopped" if t.get("status") == "stopped" else "" for t in ranked])
    differing = differences(collect(store, sweep_id))
    sections = [
        section(f"Sweep {sweep_id}", overview),
        section("Trials ranked", ranking, note(f"a trial's run id is {sweep_id}-TRIAL"), image(figures.trial_curves(histories, {t["run_id"]: t.get("status", "")
                                                                                 for t in trials},
                                                                     selection.metric, labels), "trial curves")),
        section("Configuration values that differ",
                note(", ".join(differing) if differing else "no configuration value differs between the trials")),
    ]
    if swept:
        sections.append(section("Metric vs each swept value", image(figures.metric_vs_values(
            trials, values, swept, selection.metric, _log_scale(cfg, trials, swept)), "metric vs swept values")))
    if best:
        sections += [section(f"Best trial: {labels[best]}", note(
            f"ranked first by {selection.metric}, as in `thalia-ray leaderboard {sweep_id}`; its own page follows"))]
        sections += run_sections(store, best)
    return sections


def _log_scale(cfg: Any, trials: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> list[str]:
    """Swept paths drawn on a log axis: scale parameters, log-uniform dimensions, and positive values
    spanning 100× or more."""
    space = cfg.sweep.space if cfg is not None and cfg.sweep is not None else {}
    chosen = []
    for path in paths:
        values = [t["config"].get(path) for t in trials]
        positive = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
        loguniform = path in space and space[path].loguniform is not None
        if positive and (path in LOG_SCALE or loguniform or max(values) / min(values) >= 100):
            chosen.append(path)
    return chosen


def _trial_status(trial: Mapping[str, Any]) -> str:
    if trial.get("status") == "stopped":
        return f"stopped after epoch {trial.get('epochs')}"
    return str(trial.get("status"))
