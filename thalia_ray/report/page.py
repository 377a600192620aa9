"""The report page: sections of figures and tables for a run or a sweep, written as one HTML file.

Figures are embedded as PNG data URIs and the style is inline, so the page is one self-contained
file (no scripts, no fonts or anything else from the network) that opens anywhere, also from S3.
A section that cannot be drawn (no test predictions, dataset not reachable) says why instead.
"""
from __future__ import annotations

import base64
import html
import logging
import math
from typing import Any, Iterable, Mapping, Sequence

from thalia_ray.errors import ThaliaError
from thalia_ray.storage import Location, StorageError, resolve
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.leaderboard import BREAKDOWN_COLUMNS, BREAKDOWNS, breakdown, collect, differences
from thalia_ray.store.records import PREDICTIONS, RunRecord, StoreError, utc_now

log = logging.getLogger(__name__)

PAGE = "index.html"
REPORT = "report"
WHOLE_FRAME = "whole_frame.json"  # `predict`'s record in the run folder: its output location, AP/F1
GALLERY = {"TP": 3, "FP": 3, "FN": 3, "TN": 2}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2328; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #d0d7de; padding: .25em .6em; text-align: right; }
th { background: #f6f8fa; } td.text, th.text { text-align: left; }
img { max-width: 100%; display: block; margin: .6em 0; }
.note { color: #57606a; font-style: italic; }
.stopped { color: #cf222e; }
"""


# ------------------------------------------------------------------------------------- html bits
def image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else html.escape(str(value))


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], classes: Sequence[str] = ()) -> str:
    """An HTML table; text cells align left. `classes` gives one CSS class per row (e.g. "stopped")."""
    def tag(name: str, value: Any) -> str:
        kind = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else ' class="text"'
        return f"<{name}{kind}>{cell(value)}</{name}>"

    body = []
    for i, row in enumerate(rows):
        css = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        body.append(f"<tr{css}>{''.join(tag('td', v) for v in row)}</tr>")
    head = "".join(f'<th class="text">{html.escape(h)}</th>' for h in header)
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def document(title: str, subtitle: str, sections: Sequence[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{note(subtitle)}"
            f"{''.join(sections)}</body></html>\n")


# ------------------------------------------------------------------------------------- run sections
def run_sections(store: ExperimentStore, run_id: str, gallery: bool = True) -> list[str]:
    """Overview, learning curves, test evaluation, breakdowns, gallery and predict maps of one run."""
    from thalia_ray.report import figures

    record = store.existing_run(run_id)
    status, history, results = record.read_status(), record.read_history(), record.read_results() or {}
    cfg = record.read_config()
    metrics = results.get("metrics", {})
    overview = table(["field", "value"], [
        ("run", run_id), ("status", status.get("status")), ("task", status.get("task") or cfg.model.task),
        ("model", cfg.model.name),
        ("sweep", status.get("sweep")), ("epochs", len(history)), ("best epoch", results.get("best_epoch")),
        ("restarts", results.get("restarts", 0)), ("created", status.get("created")),
        ("updated", status.get("updated"))])
    sections = [section(f"Run {run_id}", overview)]
    if history:
        monitored = cfg.train.early_stopping.metric
        extra = [m for m in ("val/f1_deformation", "val/iou_deformation", "val/ap_deformation") if m in history[-1]]
        sections.append(section("Learning curves", image(figures.learning_curves(history, monitored, extra),
                                                          "learning curves"),
                                note(f"monitored: {monitored} ({cfg.train.early_stopping.mode}); "
                                     "a dashed red line marks a restart from the last checkpoint")))
    if status.get("kind") == "pretrain":
        return sections + _pretrain_sections(record, history)
    try:
        rows = record.read_predictions("test")
    except StoreError as err:
        sections.append(section("Test evaluation", note(str(err))))
        return sections
    sections.append(_evaluation(rows, metrics))
    sections.append(_breakdowns(store, run_id))
    if gallery:
        sections.append(_gallery(store, record, cfg, rows, results))
    maps = _predict_maps(record)
    if maps:
        sections.append(maps)
    return sections


def _pretrain_sections(record: RunRecord, history: Sequence[Mapping[str, Any]]) -> list[str]:
    """A pretraining run's loss per pretext task and, for the MAE, its reconstructions (report/pretrain.py)."""
    from thalia_ray.report import pretrain

    sections = []
    if history:
        sections.append(section("Pretext tasks", image(pretrain.task_loss_figure(history), "loss per pretext task"),
                                note("each task's loss before its weight (pretrain.method_weight, pretrain.heads); "
                                     "val: the held-out groups of the pretraining periods, not the benchmark's val")))
    arrays = pretrain.read_reconstructions(record)
    if arrays is not None:
        sections.append(section("Masked-autoencoder reconstructions", image(pretrain.reconstruction_figure(arrays),
                                                                             "reconstructions"),
                                note("held-out samples; hidden patches were predicted from the visible ones "
                                     "(phase of the last member, wrapped, in radians)")))
    return sections


def _evaluation(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> str:
    from thalia_ray.report import figures

    labels, scores, preds = ([r[k] for r in rows] for k in ("label", "score", "pred"))
    per_class = []
    for cls in ("non_deformation", "deformation"):
        names = sorted({k.split("/", 1)[1].removesuffix(f"_{cls}") for k in metrics if k.startswith("test/")
                        and k.endswith(f"_{cls}") and not k.endswith(f"_non_{cls}")})
        per_class.append((cls, {n: metrics.get(f"test/{n}_{cls}") for n in names}))
    columns = sorted(set().union(*(m for _, m in per_class)))
    overall = [(k.removeprefix("test/"), v) for k, v in sorted(metrics.items())
               if k.startswith("test/") and not k.endswith(("_deformation", "_non_deformation"))]
    return section(
        f"Test evaluation ({len(rows)} samples)",
        image(figures.pr_roc(labels, scores, preds), "PR and ROC curves"),
        note("the operating point is the model's decision (argmax, i.e. P(Deformation) > 0.5)"),
        image(figures.confusion(labels, preds, ["Non_Deformation", "Deformation"]), "confusion matrix"),
        table(["class", *columns], [(cls, *(m.get(c) for c in columns)) for cls, m in per_class]),
        table(["metric", "value"], overall) if overall else "")


def _breakdowns(store: ExperimentStore, run_id: str) -> str:
    from thalia_ray.report import figures

    parts = []
    for by in BREAKDOWNS:
        groups = breakdown(store, run_id, by)
        if not groups:
            continue
        parts.append(image(figures.breakdown_chart(groups, by), f"breakdown by {by}"))
        parts.append(table([by, *BREAKDOWN_COLUMNS],
                           [(g, *(v.get(k) for k in BREAKDOWN_COLUMNS)) for g, v in sorted(groups.items())]))
    return section("Breakdowns (volcano frame, volcano, intensity, activity type)",
                   note("recall: of the group's Deformation samples at the run's threshold; false_alarms: share "
                        "of the group's other samples predicted Deformation; ap: the group's Deformation "
                        "samples ranked against every negative of the test split"), *parts)


def _gallery(store: ExperimentStore, record: RunRecord, cfg: Any, rows: Sequence[Mapping[str, Any]],
             results: Mapping[str, Any]) -> str:
    from thalia_ray.report import figures, samples

    picked = samples.pick(rows, GALLERY)
    checkpoint = None
    if cfg.model.task == "segmentation" and results.get("best_checkpoint"):
        from ray.train import Checkpoint

        checkpoint = Checkpoint(results["best_checkpoint"], filesystem=store.ray_storage()[0])
    try:
        chosen = samples.read_gallery(cfg, picked, checkpoint)
    except (ThaliaError, OSError, ValueError, KeyError) as err:
        return section("Gallery", note(f"the test samples could not be read from {cfg.data.root}: {err}"))
    parts = [image(figures.gallery_figure(s), f"{s.outcome} {s.key}") for s in chosen]
    counts = {name: sum(samples.outcome(r) == name for r in rows) for name in GALLERY}
    return section("Gallery of test samples",
                   note("true positives, false positives, false negatives and a few true negatives "
                        f"(of {counts}); white: the true mask; every member of a series is a row"), *parts)


def _predict_maps(record: RunRecord) -> str:
    """A map per frame where `predict` wrote probability cubes: under the run's predictions folder, or
    where its whole-frame evaluation (`whole_frame.json`, written by `predict`) says it wrote them."""
    from thalia_ray.report import figures, samples

    folder = record.loc.join(PREDICTIONS)
    candidates = [folder, *(folder.join(n) for n in folder.list() if not n.endswith((".json", ".zarr")))]
    whole_frame = record.loc.join(WHOLE_FRAME)
    evaluation = whole_frame.read_json() if whole_frame.exists() else {}
    if evaluation.get("out"):
        candidates.append(resolve(evaluation["out"]))
    maps = {}
    for loc in candidates:
        try:
            maps.update(samples.predicted_frames(loc))
        except StorageError as err:
            log.warning("report: %s: %s", loc, err)
    if not maps:
        return ""
    return section("Predicted maps (thalia-ray predict)",
                   *(image(figures.probability_map(m, frame), f"map {frame}") for frame, m in sorted(maps.items())))


# ------------------------------------------------------------------------------------- sweeps
def sweep_sections(store: ExperimentStore, sweep_id: str) -> list[str]:
    """Trials ranked, what the scheduler stopped and when, differing config, metric vs swept values;
    then the best trial's own report."""
    from thalia_ray.report import figures

    summary = store.sweep(sweep_id).read_summary()
    trials = summary.get("trials", [])
    metric, mode = summary.get("metric", "val/loss"), summary.get("mode", "min")
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(trials, key=lambda t: math.inf if t.get("best") is None else sign * t["best"])
    paths = sorted({p for t in trials for p in t.get("config", {})})
    differing = differences(collect(store, sweep_id))
    overview = table(["field", "value"], [
        ("sweep", sweep_id), ("status", summary.get("status")), ("metric", f"{metric} ({mode})"),
        ("trials", len(trials)), ("stopped by the scheduler", sum(t.get("status") == "stopped" for t in trials)),
        ("best run", summary.get("best_run")), ("best value", summary.get("best_value")),
        ("wall seconds", summary.get("seconds")), ("worker seconds", summary.get("worker_seconds"))])
    ranking = table(
        ["#", "run", "status", "epochs", f"best {metric}", *paths],
        [(i + 1, t["run_id"], _trial_status(t), t.get("epochs"), t.get("best"),
          *(t.get("config", {}).get(p) for p in paths)) for i, t in enumerate(ranked)],
        ["stopped" if t.get("status") == "stopped" else "" for t in ranked])
    histories = {t["run_id"]: store.run(t["run_id"]).read_history() for t in trials}
    statuses = {t["run_id"]: t.get("status", "") for t in trials}
    sections = [
        section(f"Sweep {sweep_id}", overview),
        section("Trials ranked", ranking, image(figures.trial_curves(histories, statuses, metric), "trial curves")),
        section("Configuration values that differ",
                note(", ".join(differing) if differing else "no configuration value differs between the trials")),
    ]
    if paths and trials:
        sections.append(section("Metric vs each swept value",
                                image(figures.metric_vs_values(trials, paths, metric), "metric vs swept values")))
    best = summary.get("best_run")
    if best:
        sections += [section(f"Best trial: {best}")] + run_sections(store, best)
    return sections


def _trial_status(trial: Mapping[str, Any]) -> str:
    if trial.get("status") == "stopped":
        return f"stopped after epoch {trial.get('epochs')}"
    return str(trial.get("status"))


# ------------------------------------------------------------------------------------- writing
def write_report(store: ExperimentStore, target: str, out: str | Location | None = None) -> Location:
    """Write the report of run or sweep `target`; returns the page's location.

    Default place: `{store}/runs/{id}/report/index.html`, or `{store}/sweeps/{id}/report/index.html`.
    """
    if store.sweep(target).loc.join("summary.json").exists():
        folder = store.sweep(target).loc.join(REPORT)
        title, sections = f"thalia-ray sweep {target}", sweep_sections(store, target)
    elif store.run(target).exists():
        folder = store.run(target).loc.join(REPORT)
        title, sections = f"thalia-ray run {target}", run_sections(store, target)
    else:
        raise StoreError(f"{target!r} is neither a run nor a sweep in {store.root.url}")
    page = (resolve(out) if out is not None else folder).join(PAGE)
    page.write_text(document(title, f"written {utc_now()} from {store.root.url}", sections))
    return page
