"""Per-class evaluation metrics, synchronised across workers.

`MetricSuite` accumulates state with torchmetrics, whose `compute()` all-gathers that state over
`torch.distributed` when a process group is initialised (gloo or NCCL) and works alone otherwise;
every rank gets the global result. Keep the suite on the device of the process group's backend
(`suite.to(device)`): NCCL can only gather CUDA tensors.

Keys are `{metric}_{class}` with classes `non_deformation` and `deformation`:
classification — accuracy, precision, recall, f1, ap (exact average precision, every threshold),
ap5, auroc; segmentation (pixel-wise) — accuracy, precision, recall, f1, iou, ap5. `ap5` is the
reference's (and the paper's) average precision, binned at 5 thresholds (torchmetrics
`thresholds=5`: 0, 0.25, 0.5, 0.75, 1); it is coarser than `ap` and the two are not interchangeable.
Per-class accuracy is torchmetrics' definition (correct among the samples of that class); `accuracy`
alone is overall.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
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
    binary_precision_recall_curve,
    binary_recall,
    binary_roc,
    multiclass_auroc,
    multiclass_average_precision,
)
from torchmetrics.utilities import dim_zero_cat

from thalia_ray.data import schema
from thalia_ray.data.transforms import segmentation_target

CLASS_KEYS = tuple(name.lower() for name in schema.CLASSES)  # ("non_deformation", "deformation")
REFERENCE_AP_THRESHOLDS = 5  # the reference's torchmetrics AveragePrecision(thresholds=5)


class RankingMetrics(Metric):
    """Per-class exact and 5-threshold average precision and AUROC (one-vs-rest) over every score seen.

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
            "ap5": multiclass_average_precision(*args, average=None, thresholds=REFERENCE_AP_THRESHOLDS),
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


class BinnedAP(MulticlassAveragePrecision):
    """Pixel-wise per-class AP at the reference's 5 thresholds: a fixed-size state, whatever the crop."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes=num_classes, average=None, thresholds=REFERENCE_AP_THRESHOLDS)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {"ap5": super().compute()}


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
        self.ranking: Metric = RankingMetrics(num_classes) if task == "classification" else BinnedAP(num_classes)
        self.overall = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _metrics(self) -> list[Metric | MetricCollection]:
        return [self.per_class, self.ranking, self.overall]

    def to(self, device: torch.device | str) -> "MetricSuite":
        for metric in self._metrics():
            metric.to(device)
        return self

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        probs = outputs["logits"].detach().float().softmax(dim=1)
        if self.task == "classification":
            preds, target = probs, batch["label"]
        else:
            preds, target = probs.argmax(dim=1), segmentation_target(batch["mask"])
        target = target.long().to(probs.device)
        for metric in (self.per_class, self.overall):
            metric.update(preds, target)
        self.ranking.update(probs, target)

    def compute(self) -> dict[str, float]:
        values = {"accuracy": float(self.overall.compute())}
        per_class = dict(self.per_class.compute())
        per_class.update(self.ranking.compute())
        for metric, vector in per_class.items():
            for name, value in zip(self.class_names, vector.tolist()):
                values[f"{metric}_{name}"] = value
        return values

    def reset(self) -> None:
        for metric in self._metrics():
            metric.reset()


def detection_metrics(preds: np.ndarray, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Deformation-class metrics of whole units (e.g. `predict`'s interferograms scored by their highest
    probability): `preds` and `targets` are 0/1 (1 = Deformation), `scores` the Deformation probability.
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


def subgroup_metrics(
    memberships: Sequence[Iterable[str]], preds: np.ndarray, targets: np.ndarray, scores: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per subgroup (frame, volcano, intensity, ...), what is meaningful when a group may hold one class only.

    `memberships[i]` names the groups sample i belongs to (none, one or several). For each group:
    `recall` of its positives at the run's threshold (`preds`), `false_alarms` (the share of its
    negatives predicted positive), and `ap`: its positives ranked against *all* negatives of the split,
    so that a group of positives only (intensity High) does not score AP 1 by construction.
    NaN where the group has no sample of the class a value needs.
    """
    p, t, s = (np.asarray(a).reshape(-1) for a in (preds, targets, scores))
    if not (len(p) == len(t) == len(s) == len(memberships)):
        raise ValueError(
            f"memberships, preds, targets and scores must be equally long, got "
            f"{len(memberships)}, {len(p)}, {len(t)}, {len(s)}"
        )
    p, t = p.astype(bool), t.astype(bool)
    negatives = ~t
    names = sorted({str(g) for groups in memberships for g in groups})
    result = {}
    for name in names:
        member = np.array([name in map(str, groups) for groups in memberships], dtype=bool)
        positives = member & t
        ranked = positives | negatives
        ap = math.nan
        if positives.any() and negatives.any():
            ap = float(binary_average_precision(torch.as_tensor(s[ranked]).double(),
                                                torch.as_tensor(positives[ranked]).long(), thresholds=None))
        result[name] = {
            "n": int(member.sum()),
            "n_deformation": int(positives.sum()),
            "recall": float(p[positives].mean()) if positives.any() else math.nan,
            "false_alarms": float(p[member & negatives].mean()) if (member & negatives).any() else math.nan,
            "ap": ap,
        }
    return result


@dataclass(frozen=True)
class Curves:
    """ROC and precision-recall curves of scores against 0/1 labels, one point per distinct threshold
    (torchmetrics' exact curves: ROC from (0, 0), PR ending at recall 0, precision 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def curves(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> Curves | None:
    """The Deformation score's ROC and PR curves; None when they are undefined (one class only)."""
    t = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).reshape(-1)
    positives = int(t.sum())
    if positives == 0 or positives == len(t):
        return None
    fpr, tpr, _ = binary_roc(s, t, thresholds=None)
    precision, recall, _ = binary_precision_recall_curve(s, t, thresholds=None)
    return Curves(fpr.numpy(), tpr.numpy(), precision.numpy(), recall.numpy())
