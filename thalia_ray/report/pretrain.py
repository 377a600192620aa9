"""The report sections of a pretraining run: each pretext task's loss per epoch, and the masked
autoencoder's reconstructions of held-out samples (written by the run into `reconstructions.npz`).

Like every report section, they draw what the run stored and compute nothing of their own; the page
(`report.page`) lays them out.
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from thalia_ray.report.html import image, note, section, table
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import RECONSTRUCTIONS, RunRecord


def task_losses(history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """task → (epochs, training loss, validation loss), from the history's `train/loss_<task>` columns."""
    tasks = sorted({k.removeprefix("train/loss_") for row in history for k in row if k.startswith("train/loss_")})
    return {task: ([int(row["epoch"]) for row in history], [float(row.get(f"train/loss_{task}", np.nan)) for row in history],
                   [float(row.get(f"val/loss_{task}", np.nan)) for row in history]) for task in tasks}


def task_loss_figure(history: Sequence[Mapping[str, Any]]) -> bytes:
    """One small panel per task: its training and validation loss per epoch."""
    from thalia_ray.report.figures import plt, png

    losses = task_losses(history)
    fig, axes = plt.subplots(1, max(len(losses), 1), figsize=(3.2 * max(len(losses), 1), 2.8), squeeze=False)
    for ax, (task, (epochs, train, val)) in zip(axes[0], losses.items()):
        ax.plot(epochs, train, marker="o", label="train")
        ax.plot(epochs, val, marker="o", label="val (held out)")
        ax.set(title=task, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(fig)


def read_reconstructions(record: RunRecord) -> dict[str, np.ndarray] | None:
    """The run's stored reconstructions (arrays only: loaded without unpickling), or None."""
    loc = record.loc.join(RECONSTRUCTIONS)
    if not loc.exists():
        return None
    with np.load(io.BytesIO(loc.read_bytes()), allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def reconstruction_figure(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A row per sample: the wrapped phase, what the encoder saw (hidden patches greyed), the reconstruction,
    then each multi-modal map and its reconstruction."""
    from thalia_ray.report.figures import plt, png

    maps = [name for name in arrays if name not in ("mask", "keys") and not name.endswith("_reconstructed")]
    columns = [(name, title) for base in maps for name, title in
               (((base, base), (base, f"{base}: visible"), (f"{base}_reconstructed", f"{base}: reconstructed"))
                if base == "phase" else ((base, base), (f"{base}_reconstructed", f"{base}: reconstructed")))]
    rows = len(arrays["mask"])
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.1 * len(columns), 2.1 * rows), squeeze=False)
    for r in range(rows):
        hidden = arrays["mask"][r] > 0
        for c, (name, title) in enumerate(columns):
            ax, values = axes[r][c], np.array(arrays[name][r], dtype=float)
            phase = name.startswith("phase")
            if title.endswith(": visible"):
                values[hidden] = np.nan
            ax.imshow(np.ma.masked_invalid(values), cmap="twilight" if phase else "viridis",
                      vmin=-np.pi if phase else None, vmax=np.pi if phase else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(str(arrays["keys"][r])[-24:], fontsize=6)
    return png(fig)


class PretrainReport:
    """Overview, each pretext task's loss per epoch and the masked autoencoder's reconstructions."""

    def sections(self, store: ExperimentStore, record: RunRecord) -> list[str]:
        status, history, cfg = record.read_status(), record.read_history(), record.read_config()
        overview = table(["field", "value"], [
            ("run", record.run_id), ("status", status.get("status")), ("kind", "pretrain"),
            ("model", cfg.model.name), ("time steps (T)", cfg.data.length), ("epochs", len(history)),
            ("created", status.get("created")), ("updated", status.get("updated"))])
        sections = [section(f"Run {record.run_id}", overview)]
        if history:
            sections.append(section("Pretext tasks", image(task_loss_figure(history), "loss per pretext task"),
                                    note("each task's loss before its weight (pretrain.method_weight, pretrain.heads); "
                                         "val: the held-out groups of the pretraining periods, not the benchmark's val")))
        arrays = read_reconstructions(record)
        if arrays is not None:
            sections.append(section("Masked-autoencoder reconstructions", image(reconstruction_figure(arrays),
                                                                                 "reconstructions"),
                                    note("held-out samples; hidden patches were predicted from the visible ones "
                                         "(phase of the last member, wrapped, in radians)")))
        return sections
