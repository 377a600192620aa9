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
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
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
)

from thalia_ray.data import schema
from thalia_ray.losses import segmentation_target

CLASS_KEYS = tuple(name.lower() for name in schema.CLASSES)  # ("non_deformation", "deformation")


def _per_class(num_classes: int, task: str) -> dict[str, object]:
    common = {"num_classes": num_classes, "average": None}
    metrics = {
        "accuracy": MulticlassAccuracy(**common),
        "precision": MulticlassPrecision(**common),
        "recall": MulticlassRecall(**common),
        "f1": MulticlassF1Score(**common),
    }
    if task == "classification":
        metrics["ap"] = MulticlassAveragePrecision(**common, thresholds=None)
        metrics["auroc"] = MulticlassAUROC(**common, thresholds=None)
    else:
        metrics["iou"] = MulticlassJaccardIndex(**common)
    return metrics


class MetricSuite:
    """Accumulates model outputs and targets over an epoch; `compute()` gives flat per-class floats."""

    def __init__(self, task: str, num_classes: int = 2, class_names: tuple[str, ...] = CLASS_KEYS) -> None:
        if task not in ("classification", "segmentation"):
            raise ValueError(f"unknown task {task!r}; expected classification or segmentation")
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.task = task
        self.class_names = class_names
        self.per_class = MetricCollection(_per_class(num_classes, task))
        self.overall = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def to(self, device: torch.device | str) -> "MetricSuite":
        self.per_class.to(device)
        self.overall.to(device)
        return self

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        logits = outputs["logits"].detach().float()
        if self.task == "classification":
            preds, target = logits.softmax(dim=1), batch["label"]
        else:
            preds, target = logits.argmax(dim=1), segmentation_target(batch["mask"])
        target = target.long().to(logits.device)
        self.per_class.update(preds, target)
        self.overall.update(preds, target)

    def compute(self) -> dict[str, float]:
        values = {"accuracy": float(self.overall.compute())}
        for metric, per_class in self.per_class.compute().items():
            for name, value in zip(self.class_names, per_class.tolist()):
                values[f"{metric}_{name}"] = value
        return values

    def reset(self) -> None:
        self.per_class.reset()
        self.overall.reset()


def deformation_metrics(preds: np.ndarray, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Deformation-class metrics from stored per-sample predictions (for per-group breakdowns).

    `preds` and `targets` are 0/1 (1 = Deformation), `scores` the predicted Deformation probability.
    AP is NaN without positives, AUROC without both classes; precision is 0 without predicted positives.
    """
    p, t, s = (torch.as_tensor(np.asarray(a)).reshape(-1) for a in (preds, targets, scores))
    if not (len(p) == len(t) == len(s)) or len(t) == 0:
        raise ValueError(f"preds, targets and scores must be non-empty and equally long, got {len(p)}, {len(t)}, {len(s)}")
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
