"""The names of the metrics, defined once: what is computed (`metrics.MetricSuite` keys `{metric}_{class}`),
stored (`{split}/{key}`) and displayed (leaderboard, report, progress line, run summary, demo) refers
to these. Part of the bottom layer: plain strings, nothing imported.

Adding a metric: compute it in `metrics.py` (its key follows from the torchmetrics name and the class),
name it here if anything displays it, and use the name by reference.
"""
from __future__ import annotations

TRAIN, VAL, TEST = "train", "val", "test"  # the splits a stored key starts with: `val/f1_deformation`
LOSS = "loss"

# The Deformation class's metrics (the positive class; `_non_deformation` for the other one).
DEFORMATION = "_deformation"  # the suffix of every Deformation-class key
F1 = "f1_deformation"
IOU = "iou_deformation"
AP = "ap_deformation"  # exact average precision, every threshold
AP5 = "ap5_deformation"  # the reference's, binned at 5 thresholds
AUROC = "auroc_deformation"
PRECISION = "precision_deformation"
RECALL = "recall_deformation"

# Each task's headline Deformation metric (what a run is ranked and summarised by); tasks in this order.
HEADLINE = {"classification": F1, "segmentation": IOU}


def key(split: str, name: str) -> str:
    """A stored metric's key: `key(VAL, F1)` is `val/f1_deformation`."""
    return f"{split}/{name}"
