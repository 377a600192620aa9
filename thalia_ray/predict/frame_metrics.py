"""Whole-frame evaluation: detection metrics of the unit scores wherever annotated labels exist.

A unit's score is its highest pixel probability and its prediction is that score at or above the
threshold, so AP ranks whole interferograms (or series) and F1 counts whole-frame detections.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from thalia_ray.metrics import detection_metrics

# The decision the run's own metrics use: the Deformation class wins the two-class argmax exactly
# when its probability exceeds one half.
DEFAULT_THRESHOLD = 0.5


def whole_frame_metrics(rows: Sequence[dict[str, Any]], threshold: float) -> dict[str, Any] | None:
    """{threshold, n, overall: {ap, f1, ...}, per_frame: {frame: {...}}}, or None without annotated rows."""
    labelled = [r for r in rows if r.get("annotated_label") is not None]
    if not labelled:
        return None
    frames = np.array([r["frame_id"] for r in labelled])
    targets = np.array([int(r["annotated_label"]) for r in labelled])
    scores = np.array([float(r["max_probability"]) for r in labelled])
    preds = (scores >= threshold).astype(np.int64)
    return {
        "threshold": threshold,
        "n": len(labelled),
        "overall": _clean(detection_metrics(preds, targets, scores)),
        "per_frame": {str(f): _clean(detection_metrics(*(a[frames == f] for a in (preds, targets, scores))))
                      for f in np.unique(frames)},
    }


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    """NaN (AP without positives) becomes None, so the JSON is standard."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
