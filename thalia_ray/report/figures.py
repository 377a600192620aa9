"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes plain data (lists, arrays, dicts read from the store) and knows nothing about
where it came from, so every figure can be drawn from any run's records.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 90
OUTCOME_COLOURS = {"TP": "#1a7f37", "FP": "#cf222e", "FN": "#bf8700", "TN": "#57606a"}


def png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _series(history: Sequence[Mapping[str, Any]], name: str) -> tuple[list[int], list[float]]:
    points = [(int(h["epoch"]), float(h[name])) for h in history if isinstance(h.get(name), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def restart_epochs(history: Sequence[Mapping[str, Any]]) -> list[int]:
    """Epochs that ran right after training resumed from a checkpoint (the `restarts` count went up)."""
    counts = [int(h.get("restarts", 0)) for h in history]
    return [int(h["epoch"]) for prev, cur, h in zip([0, *counts], counts, history) if cur > prev]


def learning_curves(history: Sequence[Mapping[str, Any]], monitored: str, extra: Sequence[str] = ()) -> bytes:
    """Loss, the monitored metric (and `extra` metrics) and the learning rate per epoch; restarts marked."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = [("loss", ["train/loss", "val/loss"]), ("metric", list(dict.fromkeys([monitored, *extra]))),
              ("learning rate", ["lr"])]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            epochs, values = _series(history, name)
            if epochs:
                ax.plot(epochs, values, marker="o", label=name)
        for i, epoch in enumerate(restart_epochs(history)):
            ax.axvline(epoch - 0.5, color="#cf222e", linestyle="--", label="restart" if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return png(fig)


@dataclass(frozen=True)
class Curves:
    """ROC and PR curves of scores against 0/1 labels, one point per distinct threshold."""

    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def curves(labels: np.ndarray, scores: np.ndarray) -> Curves | None:
    """None when a curve is undefined (no positive or no negative sample)."""
    labels = np.asarray(labels, dtype=float)
    positives, negatives = labels.sum(), len(labels) - labels.sum()
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    sorted_scores = np.asarray(scores, dtype=float)[order]
    tp, fp = np.cumsum(labels[order]), np.cumsum(1 - labels[order])
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(labels) - 1]  # last index of each threshold
    tp, fp = tp[last], fp[last]
    return Curves(fpr=np.r_[0.0, fp / negatives], tpr=np.r_[0.0, tp / positives],
                  precision=np.r_[1.0, tp / (tp + fp)], recall=np.r_[0.0, tp / positives])


def confusion_counts(labels: Sequence[int], preds: Sequence[int]) -> np.ndarray:
    """[[TN, FP], [FN, TP]] (rows: true class, columns: predicted class)."""
    matrix = np.zeros((2, 2), dtype=int)
    for label, pred in zip(labels, preds):
        matrix[int(label), int(pred)] += 1
    return matrix


def pr_roc(labels: Sequence[int], scores: Sequence[float], preds: Sequence[int]) -> bytes:
    """ROC and precision-recall curves of the Deformation score, with the run's operating point."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    found = curves(np.asarray(labels), np.asarray(scores))
    (tn, fp), (fn, tp) = confusion_counts(labels, preds)
    for ax, title, xlabel, ylabel in ((roc_ax, "ROC", "false positive rate", "true positive rate"),
                                      (pr_ax, "precision-recall", "recall", "precision")):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    if found is None:
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "undefined: the split has one class only", ha="center", va="center")
        return png(fig)
    roc_ax.plot(found.fpr, found.tpr, label="Deformation")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    roc_ax.plot(fp / max(fp + tn, 1), tp / max(tp + fn, 1), "o", color="#cf222e", label="operating point")
    pr_ax.step(found.recall, found.precision, where="post", label="Deformation")
    pr_ax.axhline(np.mean(labels), color="grey", linestyle=":", label="chance")
    pr_ax.plot(tp / max(tp + fn, 1), tp / max(tp + fp, 1), "o", color="#cf222e", label="operating point")
    for ax in (roc_ax, pr_ax):
        ax.legend(fontsize=8, loc="lower right")
    return png(fig)


def confusion(labels: Sequence[int], preds: Sequence[int], classes: Sequence[str]) -> bytes:
    matrix = confusion_counts(labels, preds)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black", fontsize=13)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    return png(fig)


def breakdown_chart(groups: Mapping[str, Mapping[str, float]], by: str) -> bytes:
    """Per group: recall of its Deformation samples, its false-alarm share and AP against all negatives
    (metrics.subgroup_metrics); the group's sample counts under its name. A missing value is no bar."""
    names = sorted(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.4))
    x = np.arange(len(names))
    for i, metric in enumerate(("recall", "false_alarms", "ap")):
        values = [groups[n].get(metric, math.nan) for n in names]
        ax.bar(x + (i - 1) * 0.27, np.nan_to_num(values, nan=0.0), width=0.27, label=metric)
    ax.set_xticks(x, [f"{n}\nn={int(groups[n]['n'])}, def={int(groups[n]['n_deformation'])}" for n in names],
                  fontsize=8)
    ax.set(ylim=(0, 1.05), title=f"Deformation metrics by {by} (test)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def trial_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], statuses: Mapping[str, str],
                 metric: str) -> bytes:
    """The sweep metric per epoch for every trial; a trial stopped by the scheduler ends in a cross."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for run_id, history in histories.items():
        epochs, values = _series(history, metric)
        if not epochs:
            continue
        stopped = statuses.get(run_id) == "stopped"
        line, = ax.plot(epochs, values, marker="o", linestyle="--" if stopped else "-", label=run_id[-12:])
        if stopped:
            ax.plot(epochs[-1], values[-1], "x", color=line.get_color(), markersize=12, markeredgewidth=2)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per trial (✕: stopped by the scheduler)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png(fig)


def metric_vs_values(trials: Sequence[Mapping[str, Any]], paths: Sequence[str], metric: str) -> bytes:
    """One panel per swept configuration path: each trial's best metric against its value."""
    fig, axes = plt.subplots(1, max(len(paths), 1), figsize=(4.2 * max(len(paths), 1), 3.4), squeeze=False)
    for ax, path in zip(axes[0], paths):
        values = [t["config"].get(path) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({repr(v) for v in values})
        xs = values if numeric else [categories.index(repr(v)) for v in values]
        for x, trial in zip(xs, trials):
            colour = "#cf222e" if trial.get("status") == "stopped" else "#0969da"
            ax.plot(x, np.nan if trial.get("best") is None else trial["best"], "o", color=colour)
        if numeric and min(values) > 0 and max(values) / min(values) >= 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), [c.strip("'") for c in categories], fontsize=8)
        ax.set(xlabel=path, ylabel=f"best {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: completed, red: stopped", fontsize=9, loc="left")
    return png(fig)


def gallery_figure(sample: Any) -> bytes:
    """One test sample (see samples.GallerySample): a row per series member, true mask outlined in white."""
    steps = sample.phase.shape[0]
    columns = ["wrapped phase (rad)", "coherence", "DEM (m)", "prediction"]
    fig, axes = plt.subplots(steps, 4, figsize=(10, 2.6 * steps), squeeze=False)
    for t in range(steps):
        panels = [(sample.phase[t], "twilight", (-math.pi, math.pi)), (sample.coherence[t], "gray", None),
                  (sample.dem[t], "terrain", None)]
        for col, (image, cmap, limits) in enumerate(panels):
            ax = axes[t][col]
            shown = ax.imshow(image, cmap=cmap, vmin=limits[0] if limits else None, vmax=limits[1] if limits else None)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            _outline(ax, sample.mask[t], "white")
        _prediction_panel(axes[t][3], sample, t)
        axes[t][0].set_ylabel(sample.dates[t], fontsize=8)
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    colour = OUTCOME_COLOURS.get(sample.outcome, "black")
    fig.suptitle(f"{sample.outcome}  {sample.key}  score {sample.score:.3f}  (label {sample.label}, "
                 f"predicted {sample.pred})", color=colour, fontsize=10)
    return png(fig)


def _outline(ax: Any, mask: np.ndarray, colour: str) -> None:
    if np.any(mask > 0):
        ax.contour(mask > 0, levels=[0.5], colors=colour, linewidths=1.2)


def _prediction_panel(ax: Any, sample: Any, t: int) -> None:
    """The predicted probability map (segmentation) with the true outline, else the sample's score."""
    if sample.predicted is not None:
        shown = ax.imshow(sample.predicted, cmap="magma", vmin=0, vmax=1)
        ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
        _outline(ax, sample.mask[t], "cyan")
        return
    ax.barh([0], [sample.score], color=OUTCOME_COLOURS.get(sample.outcome, "grey"))
    ax.axvline(0.5, color="black", linestyle=":")
    ax.set(xlim=(0, 1), ylim=(-1, 1))
    ax.text(0.5, 0.85, f"P(Deformation) = {sample.score:.3f}", ha="center", fontsize=9, transform=ax.transAxes)


def probability_map(probability: np.ndarray, frame_id: str) -> bytes:
    """A predicted frame: the largest Deformation probability of any date at each pixel."""
    fig, ax = plt.subplots(figsize=(5, 4.4))
    shown = ax.imshow(probability, cmap="magma", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label="max P(Deformation)")
    ax.set(title=f"frame {frame_id}", xticks=[], yticks=[])
    return png(fig)
