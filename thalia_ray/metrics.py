"""Per-class evaluation metrics, synchronised across workers.

`MetricSuite` accumulates state with torchmetrics, whose `compute()` all-gathers that state over
`torch.distributed` when a process group is initialised (gloo or NCCL) and works alone otherwise;
every rank gets the global result. Keep the suite on the device of the process group's backend
(`suite.to(device)`): NCCL can only gather CUDA tensors.

Keys are `{metric}_{class}` with classes `non_deformation` and `deformation`:
classification — accuracy, precision, recall, f1, ap (exact average precision, every threshold),
auroc; segmentation (pixel-wise) — accuracy, precision, recall, f1, iou. Per-class accuracy is
torchmetrics' definition (correct among the samples of that class); `accuracy` alone is overall.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_precision,
    binary_recall,
    multiclass_auroc,
    multiclass_average_precision,
)
from torchmetrics.utilities import dim_zero_cat

from thalia_ray.data import schema
from thalia_ray.losses import segmentation_target

CLASS_KEYS = tuple(name.lower() for name in schema.CLASSES)  # ("non_deformation", "deformation")


class RankingMetrics(Metric):
    """Per-class exact average precision and AUROC (one-vs-rest) over every score seen.

    States are flat float32 lists: when a rank saw no sample (a small validation split over many
    workers) torchmetrics joins the all-gather with an empty 1-D float32 tensor, which only lines
    up with the other ranks when theirs are 1-D float32 too (2-D or int64 states abort gloo).
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        self.probs.append(probs.float().flatten())
        self.target.append(target.float())

    def compute(self) -> dict[str, Tensor]:
        probs = dim_zero_cat(self.probs).reshape(-1, self.num_classes)
        args = (probs, dim_zero_cat(self.target).long(), self.num_classes)
        return {
            "ap": multiclass_average_precision(*args, average=None, thresholds=None),
            "auroc": multiclass_auroc(*args, average=None, thresholds=None),
        }


def _confusion_metrics(num_classes: int, task: str) -> MetricCollection:
    common = {"num_classes": num_classes, "average": None}
    metrics = {
        "accuracy": MulticlassAccuracy(**common),
        "precision": MulticlassPrecision(**common),
        "recall": MulticlassRecall(**common),
        "f1": MulticlassF1Score(**common),
    }
    if task == "segmentation":
        metrics["iou"] = MulticlassJaccardIndex(**common)
    return MetricCollection(metrics)


class MetricSuite:
    """Accumulates model outputs and targets over an epoch; `compute()` gives flat per-class floats."""

    def __init__(self, task: str, num_classes: int = 2, class_names: tuple[str, ...] = CLASS_KEYS) -> None:
        if task not in ("classification", "segmentation"):
            raise ValueError(f"unknown task {task!r}; expected classification or segmentation")
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.task = task
        self.class_names = class_names
        self.per_class = _confusion_metrics(num_classes, task)
        self.ranking = RankingMetrics(num_classes) if task == "classification" else None
        self.overall = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _metrics(self) -> list[Metric | MetricCollection]:
        return [m for m in (self.per_class, self.ranking, self.overall) if m is not None]

    def to(self, device: torch.device | str) -> "MetricSuite":
        for metric in self._metrics():
            metric.to(device)
        return self

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        logits = outputs["logits"].detach().float()
        if self.task == "classification":
            preds, target = logits.softmax(dim=1), batch["label"]
        else:
            preds, target = logits.argmax(dim=1), segmentation_target(batch["mask"])
        target = target.long().to(logits.device)
        for metric in self._metrics():
            metric.update(preds, target)

    def compute(self) -> dict[str, float]:
        values = {"accuracy": float(self.overall.compute())}
        per_class = dict(self.per_class.compute())
        if self.ranking is not None:
            per_class.update(self.ranking.compute())
        for metric, vector in per_class.items():
            for name, value in zip(self.class_names, vector.tolist()):
                values[f"{metric}_{name}"] = value
        return values

    def reset(self) -> None:
        for metric in self._metrics():
            metric.reset()


def deformation_metrics(preds: np.ndarray, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Deformation-class metrics from stored per-sample predictions (for per-group breakdowns).

    `preds` and `targets` are 0/1 (1 = Deformation), `scores` the predicted Deformation probability.
    AP is NaN without positives, AUROC without both classes; precision is 0 without predicted positives.
    """
    p, t, s = (torch.as_tensor(np.asarray(a)).reshape(-1) for a in (preds, targets, scores))
    if not (len(p) == len(t) == len(s)) or len(t) == 0:
        raise ValueError(
            f"preds, targets and scores must be non-empty and equally long, got {len(p)}, {len(t)}, {len(s)}"
        )
    p, t, s = p.long(), t.long(), s.double()
    positives = int(t.sum())
    both_classes = 0 < positives < len(t)
    return {
        "n": len(t),
        "n_deformation": positives,
        "accuracy": float(binary_accuracy(p, t)),
        "precision": float(binary_precision(p, t)),
        "recall": float(binary_recall(p, t)),
        "f1": float(binary_f1_score(p, t)),
        "ap": float(binary_average_precision(s, t, thresholds=None)) if positives else math.nan,
        "auroc": float(binary_auroc(s, t, thresholds=None)) if both_classes else math.nan,
    }


def grouped_metrics(
    groups: np.ndarray, preds: np.ndarray, targets: np.ndarray, scores: np.ndarray
) -> dict[str, dict[str, float]]:
    """`deformation_metrics` for each distinct value of `groups` (e.g. frame id, intensity level)."""
    groups = np.asarray(groups)
    arrays = [np.asarray(a) for a in (preds, targets, scores)]
    return {
        str(g): deformation_metrics(*(a[groups == g] for a in arrays)) for g in np.unique(groups)
    }
