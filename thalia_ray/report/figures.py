"""The report's figures, drawn with matplotlib (Agg, no display) and returned as PNG bytes.

Each function takes plain data (lists, arrays, dicts read from the store) and knows nothing about
where it came from, so every figure can be drawn from any run's records.
"""
from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
import numpy as np  # noqa: E402

DPI = 90
OUTCOME_COLOURS = {"TP": "#1a7f37", "FP": "#cf222e", "FN": "#bf8700", "TN": "#57606a"}


def png(fig: Figure) -> bytes:
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


def _mark_epochs(ax: Any, history: Sequence[Mapping[str, Any]], best_epoch: int | None) -> None:
    for i, epoch in enumerate(restart_epochs(history)):
        ax.axvline(epoch - 0.5, color="#cf222e", linestyle="--", label="restart" if i == 0 else None)
    if best_epoch is not None:
        ax.axvline(best_epoch, color="#1a7f37", linestyle=":", label="tested checkpoint")


def learning_curves(history: Sequence[Mapping[str, Any]], metrics: Sequence[str], best_epoch: int | None = None) -> bytes:
    """Loss, validation `metrics` and the learning rate (log scale) per epoch; restarts and the epoch
    whose checkpoint was tested marked."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), layout="constrained")
    panels = [("loss", ["train/loss", "val/loss"]), ("validation metrics", list(dict.fromkeys(metrics))),
              ("learning rate", ["lr"])]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            epochs, values = _series(history, name)
            if epochs:
                ax.plot(epochs, values, marker="o", label=name)
        _mark_epochs(ax, history, best_epoch)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    rates = _series(history, "lr")[1]
    if rates and min(rates) > 0:
        axes[2].set_yscale("log")
    return png(fig)


def confusion_counts(labels: Sequence[int], preds: Sequence[int]) -> np.ndarray:
    """[[TN, FP], [FN, TP]] (rows: true class, columns: predicted class)."""
    matrix = np.zeros((2, 2), dtype=int)
    for label, pred in zip(labels, preds):
        matrix[int(label), int(pred)] += 1
    return matrix


def pr_roc(labels: Sequence[int], scores: Sequence[float], preds: Sequence[int]) -> bytes:
    """ROC and precision-recall curves of the Deformation score (torchmetrics), with the run's operating point."""
    from thalia_ray.metrics import curves

    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    found = curves(labels, scores)
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
    fig, ax = plt.subplots(figsize=(4, 3.6), layout="constrained")
    ax.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black", fontsize=13)
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    return png(fig)


def breakdown_chart(groups: Mapping[str, Mapping[str, float]], by: str) -> bytes:
    return png(draw_breakdown(groups, by))


def draw_breakdown(groups: Mapping[str, Mapping[str, float]], by: str) -> Figure:
    """Per group, one row: recall of its Deformation samples, its false-alarm share and AP against all
    negatives (metrics.subgroup_metrics), its sample counts beside its name. Horizontal, so that long
    names (a frame covering nine volcanoes) never overlap. A missing value is no bar."""
    names = sorted(groups, key=str.casefold)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.5), layout="constrained")
    y = np.arange(len(names))
    for i, metric in enumerate(("recall", "false_alarms", "ap")):
        values = [groups[n].get(metric, math.nan) for n in names]
        ax.barh(y + (i - 1) * 0.27, np.nan_to_num(values, nan=0.0), height=0.27, label=metric)
    ax.set_yticks(y, [f"{n}  (n={int(groups[n]['n'])}, def={int(groups[n]['n_deformation'])})" for n in names],
                  fontsize=8)
    ax.invert_yaxis()  # in alphabetical order from the top
    ax.set(xlim=(0, 1.05), title=f"Deformation metrics by {by} (test)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="x", alpha=0.3)
    return fig


def trial_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], statuses: Mapping[str, str],
                 metric: str, labels: Mapping[str, str]) -> bytes:
    """The sweep metric per epoch for every trial (legend: `labels`, whole); a trial stopped by the
    scheduler ends in a cross."""
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    for run_id, history in histories.items():
        epochs, values = _series(history, metric)
        if not epochs:
            continue
        stopped = statuses.get(run_id) == "stopped"
        line, = ax.plot(epochs, values, marker="o", linestyle="--" if stopped else "-", label=labels.get(run_id, run_id))
        if stopped:
            ax.plot(epochs[-1], values[-1], "x", color=line.get_color(), markersize=12, markeredgewidth=2)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per trial (✕: stopped by the scheduler)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return png(fig)


def metric_vs_values(trials: Sequence[Mapping[str, Any]], best: Mapping[str, float | None], paths: Sequence[str],
                     metric: str, log_paths: Sequence[str] = ()) -> bytes:
    """One panel per swept configuration path: each trial's best metric (`best`, by run id) against
    its value; paths in `log_paths` on a log axis."""
    fig, axes = plt.subplots(1, max(len(paths), 1), figsize=(4.2 * max(len(paths), 1), 3.4), squeeze=False,
                             layout="constrained")
    for ax, path in zip(axes[0], paths):
        values = [t["config"].get(path) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({repr(v) for v in values})
        xs = values if numeric else [categories.index(repr(v)) for v in values]
        for x, trial in zip(xs, trials):
            colour = "#cf222e" if trial.get("status") == "stopped" else "#0969da"
            value = best.get(trial["run_id"])
            ax.plot(x, np.nan if value is None else value, "o", color=colour)
        if numeric and path in log_paths:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(categories)), [c.strip("'") for c in categories], fontsize=8)
        ax.set(xlabel=path, ylabel=f"best {metric}")
        ax.grid(alpha=0.3)
    axes[0][0].set_title("blue: completed, red: stopped", fontsize=9, loc="left")
    return png(fig)


IMAGE_PANELS = (("wrapped phase (rad)", "phase", "twilight", (-math.pi, math.pi)), ("coherence", "coherence", "gray", None),
                ("DEM (m)", "dem", "terrain", None))


def gallery_figure(sample: Any) -> bytes:
    return png(draw_gallery(sample))


def draw_gallery(sample: Any) -> Figure:
    """One test sample (see samples.GallerySample): a row of phase, coherence and DEM per series member
    (true mask outlined in white, dates as the row's title), and the model's answer beside them: the
    probability map with the training target outlined (pixel-wise tasks), else the sample's score."""
    steps = sample.phase.shape[0]
    per_step = sample.predicted is not None and sample.predicted.ndim == 3
    fig = plt.figure(figsize=(11, 2.4 * steps + 0.6), layout="constrained")
    grid = fig.add_gridspec(steps, 4, width_ratios=[1, 1, 1, 1 if sample.predicted is not None else 0.5])
    for t in range(steps):
        for col, (title, field, cmap, limits) in enumerate(IMAGE_PANELS):
            ax = fig.add_subplot(grid[t, col])
            shown = ax.imshow(getattr(sample, field)[t], cmap=cmap, vmin=limits[0] if limits else None,
                              vmax=limits[1] if limits else None)
            fig.colorbar(shown, ax=ax, shrink=0.9)
            _outline(ax, sample.mask[t], "white")
            _bare(ax, title if t == 0 else None)
            if col == 0:
                ax.set_ylabel(sample.dates[t], fontsize=8)
        if per_step:
            _prediction_panel(fig, fig.add_subplot(grid[t, 3]), sample, sample.predicted[t], sample.target[t], t == 0)
    if not per_step:
        target = sample.target if sample.target.ndim == 2 else sample.target.max(axis=0)
        _prediction_panel(fig, fig.add_subplot(grid[:, 3]), sample, sample.predicted, target, True)
    fig.suptitle(f"{sample.outcome}  {sample.key}  score {sample.score:.3f}  (label {sample.label}, "
                 f"predicted {sample.pred})", color=OUTCOME_COLOURS.get(sample.outcome, "black"), fontsize=10)
    return fig


def _bare(ax: Any, title: str | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _outline(ax: Any, mask: np.ndarray, colour: str) -> None:
    if np.any(mask > 0):
        ax.contour(mask > 0, levels=[0.5], colors=colour, linewidths=1.2)


def _prediction_panel(fig: Any, ax: Any, sample: Any, predicted: np.ndarray | None, target: np.ndarray,
                      titled: bool) -> None:
    """The probability map with the target outlined in cyan, else a gauge of the sample's score."""
    if predicted is not None:
        shown = ax.imshow(predicted, cmap="magma", vmin=0, vmax=1)
        fig.colorbar(shown, ax=ax, shrink=0.9)
        _outline(ax, target, "cyan")
        _bare(ax, "P(Deformation), target in cyan" if titled else None)
        return
    ax.bar([0], [sample.score], width=0.6, color=OUTCOME_COLOURS.get(sample.outcome, "grey"))
    ax.axhline(0.5, color="black", linestyle=":")  # the decision threshold
    ax.set(xlim=(-1, 1), ylim=(0, 1), xticks=[])
    ax.set_title(f"P(Deformation) = {sample.score:.3f}", fontsize=9)


def probability_map(probability: np.ndarray, frame_id: str) -> bytes:
    """A predicted frame: the largest Deformation probability of any date at each pixel."""
    fig, ax = plt.subplots(figsize=(5, 4.4), layout="constrained")
    shown = ax.imshow(probability, cmap="magma", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label="max P(Deformation)")
    ax.set(title=f"frame {frame_id}", xticks=[], yticks=[])
    return png(fig)
