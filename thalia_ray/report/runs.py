"""The report's sections for one run, chosen by the run's kind (`run.json` "kind").

`RUN_REPORTS` maps each kind to its report: any object with `sections(store, record)` returning HTML
sections (see `html`). A new kind of run (e.g. pretraining) adds its own class and one entry here.
`TrainedModelReport` serves classifiers and segmenters, single interferograms and series, trained
alone or as a sweep trial; what differs between tasks is in TASK_VIEWS.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from thalia_ray.errors import ThaliaError
from thalia_ray.report.html import image, note, section, table
from thalia_ray.report.pretrain import PretrainReport
from thalia_ray.storage import StorageError, resolve
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.leaderboard import BREAKDOWN_COLUMNS, BREAKDOWNS, Selection, breakdown, sweep_selection
from thalia_ray.metric_names import AP, HEADLINE, TEST, VAL, key
from thalia_ray.store.records import PREDICTIONS, RunRecord, StoreError, evaluated
from thalia_ray.traffic import Traffic, epoch_samples, request_cost

log = logging.getLogger(__name__)

GALLERY = {"TP": 3, "FP": 3, "FN": 3, "TN": 2}
OUTCOMES = {"TP": "true positives", "FP": "false positives", "FN": "false negatives", "TN": "true negatives"}


@dataclass(frozen=True)
class TaskView:
    """What a task's page shows its own way."""

    pixel_maps: bool  # the gallery draws the model's probability map (read from its best checkpoint)
    decision: str  # how a test sample's score and decision come about


TASK_VIEWS = {
    "classification": TaskView(False, "a sample's score is P(Deformation); it is predicted Deformation when the "
                                      "score exceeds 0.5 (the argmax); the dot is that operating point"),
    "segmentation": TaskView(True, "sample level: a sample's score is its largest pixel probability of Deformation, "
                                   "and it is predicted Deformation when any pixel is (the pixel argmax); the dot is "
                                   "that operating point; the table's metrics are pixel-wise"),
}


class RunReport(Protocol):
    def sections(self, store: ExperimentStore, record: RunRecord) -> list[str]:
        """The run's HTML sections, its title section first."""


class TrainedModelReport:
    """Overview, learning curves, test evaluation, breakdowns, a gallery of test samples and predict's maps."""

    def sections(self, store: ExperimentStore, record: RunRecord) -> list[str]:
        status, history, results = record.read_status(), record.read_history(), record.read_results() or {}
        cfg = record.read_config()
        task = cfg.model.task
        ranked_by = (sweep_selection(store, status["sweep"]) if status.get("sweep") else None) or Selection.default(task)
        metrics = results.get("metrics", {})
        sections = [section(f"Run {record.run_id}", _overview(record.run_id, status, cfg, history, results, ranked_by))]
        if history:
            sections.append(_learning_curves(history, cfg, results, ranked_by))
            storage = _storage(history, cfg.storage.request_price_per_1000)
            sections += [storage] if storage else []
        try:
            rows = record.read_predictions("test")
        except StoreError as err:
            sections.append(section("Test evaluation", note(str(err))))
            return sections
        view = TASK_VIEWS[task]
        sections += [_evaluation(rows, metrics, view), _breakdowns(store, record.run_id),
                     _gallery(store, record, cfg, rows, view)]
        maps = _predict_maps(record)
        return sections + ([maps] if maps else [])


# Every kind a run record can have (store.records.Kind): a trained classifier or segmenter, or a pretrained encoder.
RUN_REPORTS: dict[str, RunReport] = {**{kind: TrainedModelReport() for kind in ("train", "sweep-trial", "evaluate", "bench")},
                                     "pretrain": PretrainReport()}


def run_sections(store: ExperimentStore, run_id: str) -> list[str]:
    """The sections of run `run_id`'s page, by the report of its kind."""
    record = store.existing_run(run_id)
    kind = record.read_status().get("kind", "train")
    if kind not in RUN_REPORTS:
        raise StoreError(f"run {run_id} is of kind {kind!r}, which has no report (reports: {', '.join(RUN_REPORTS)})")
    return RUN_REPORTS[kind].sections(store, record)


# ------------------------------------------------------------------------------------- sections
def _overview(run_id: str, status: Mapping[str, Any], cfg: Any, history: Sequence[Mapping[str, Any]],
              results: Mapping[str, Any], ranked_by: Selection) -> str:
    """The run's identity and headline numbers; how many val/test samples the metrics cover, flagged (and
    explained in a note) where they cover fewer than the split holds."""
    metrics = results.get("metrics", {})
    headline = key(TEST, HEADLINE[cfg.model.task])
    rows = [
        ("run", run_id), ("status", status.get("status")), ("kind", status.get("kind", "train")),
        ("task", cfg.model.task), ("model", cfg.model.name), ("time steps (T)", cfg.data.length),
        ("sweep", status.get("sweep")), ("epochs", len(history)),
        (f"best {ranked_by.metric} (ranked by)", ranked_by.value(history, metrics)),
        ("tested checkpoint: epoch", results.get("best_epoch")), (headline, metrics.get(headline)),
        ("restarts", results.get("restarts", 0)), ("created", status.get("created")),
        ("updated", status.get("updated"))]
    counted = [(split, counts) for split in ("val", "test") if (counts := evaluated(metrics, split)) is not None]
    flags = [""] * len(rows) + ["stopped" if n < m else "" for _, (n, m) in counted]
    rows += [(f"{split} samples evaluated", f"{n} of {m}") for split, (n, m) in counted]
    short = [f"{split}: {n} of {m}" for split, (n, m) in counted if n < m]
    shortfall = note(f"metrics over fewer samples than the split holds ({'; '.join(short)}): samples were "
                     "skipped as unreadable (skipped.json) or left out (several workers' equal split, a step cap)")
    return table(["field", "value"], rows, flags) + (shortfall if short else "")


def _learning_curves(history: Sequence[Mapping[str, Any]], cfg: Any, results: Mapping[str, Any],
                     ranked_by: Selection) -> str:
    from thalia_ray.report import figures

    stopping = cfg.train.early_stopping
    wanted = [ranked_by.metric, stopping.metric, key(VAL, HEADLINE[cfg.model.task]), key(VAL, AP)]
    shown = [m for m in dict.fromkeys(wanted) if not m.endswith("loss") and any(m in h for h in history)]
    return section("Learning curves", image(figures.learning_curves(history, shown, results.get("best_epoch")),
                                            "learning curves"),
                   note(f"ranked by {ranked_by.metric} ({ranked_by.mode}; {ranked_by.source}). The tested checkpoint "
                        f"is the epoch with the best {stopping.metric} ({stopping.mode}; train.early_stopping), "
                        "marked by the dotted green line; a dashed red line marks a restart from the last checkpoint."))


def _storage(history: Sequence[Mapping[str, Any]], price_per_1000: float) -> str | None:
    """Object-storage traffic per epoch with its request cost; None for a run that read none."""
    rows = [row for row in history if Traffic.from_metrics(row)]
    if not rows:
        return None
    body = []
    for row in [*rows, None]:
        traffic = Traffic.from_metrics(row) if row is not None else Traffic.total(rows)
        samples = epoch_samples(row) if row is not None else None
        body.append((str(int(row["epoch"])) if row is not None else "all", f"{traffic.requests:,}",
                     f"{traffic.requests / samples:.1f}" if samples else "-", f"{traffic.bytes / 2**20:,.1f}",
                     f"{traffic.cache_hits:,}", f"{traffic.retries:,}", f"{traffic.throttles:,}",
                     f"{request_cost(traffic.requests, price_per_1000):.4g}"))
    header = ["epoch", "GET requests", "per sample", "MiB fetched", "cache hits", "retries", "throttled", "request cost"]
    return section("Storage traffic", table(header, body),
                   note(f"requests priced at {price_per_1000:g} per 1,000 GETs (storage.request_price_per_1000); "
                        "every attempt counts, retries included"))


def _evaluation(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any], view: TaskView) -> str:
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
        image(figures.pr_roc(labels, scores, preds), "PR and ROC curves"), note(view.decision),
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
             view: TaskView) -> str:
    from thalia_ray.report import figures, samples

    picked = samples.pick(rows, GALLERY)
    try:
        checkpoint = None
        if view.pixel_maps:
            from thalia_ray.predict.inputs import run_checkpoint

            _, checkpoint, _ = run_checkpoint(store, record.run_id)
        chosen = samples.read_gallery(cfg, picked, checkpoint)
    except (ThaliaError, OSError, ValueError, KeyError) as err:
        return section("Gallery of test samples", note(f"the test samples could not be read from {cfg.data.root}: {err}"))
    counts = Counter(samples.outcome(r) for r in rows)
    shown = ", ".join(f"up to {n} {OUTCOMES[o]}" for o, n in GALLERY.items())
    split = ", ".join(f"{counts[o]} {o}" for o in GALLERY)
    answer = "the model's probability map with the training target outlined in cyan" if view.pixel_maps \
        else "the sample's score, the dotted line the 0.5 threshold"
    return section("Gallery of test samples",
                   note(f"the most confident hits and mistakes: {shown} (the test split has {split}). Each "
                        f"interferogram of a sample is a row, titled with its dates; white: the true mask; right: "
                        f"{answer}."),
                   *(image(figures.gallery_figure(s), f"{s.outcome} {s.key}") for s in chosen))


def _predict_maps(record: RunRecord) -> str:
    """A map per frame where `predict` wrote probability cubes: under the run's predictions folder, or
    where its whole-frame evaluation (`whole_frame.json`, written by `predict`) says it wrote them."""
    from thalia_ray.report import figures, samples

    folder = record.loc.join(PREDICTIONS)
    candidates = [folder, *(folder.join(n) for n in folder.list() if not n.endswith((".json", ".zarr")))]
    evaluation = record.read_whole_frame() or {}
    if evaluation.get("out"):
        candidates.append(resolve(evaluation["out"], record.loc.s3))  # with the store's storage settings
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
