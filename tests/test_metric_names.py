"""The metric names displayed everywhere are the keys the metric suite computes and a run stores."""
from __future__ import annotations

import torch

from thalia_ray import metric_names as names
from thalia_ray.leaderboard import Selection
from thalia_ray.metrics import MetricSuite
from thalia_ray.progress import progress_line


def _computed(task: str) -> set[str]:
    torch.manual_seed(0)
    suite = MetricSuite(task)
    if task == "classification":
        suite.update({"logits": torch.randn(8, 2)}, {"label": torch.tensor([0, 1] * 4)})
    else:
        suite.update({"logits": torch.randn(2, 2, 4, 4)}, {"mask": torch.randint(0, 2, (2, 4, 4))})
    return set(suite.compute())


def test_the_named_deformation_metrics_are_computed_by_the_suite() -> None:
    assert {names.F1, names.AP, names.AP5, names.AUROC, names.PRECISION, names.RECALL} <= _computed("classification")
    assert {names.IOU, names.F1, names.AP5, names.PRECISION, names.RECALL} <= _computed("segmentation")
    assert all(k.endswith(names.DEFORMATION) for k in (names.F1, names.IOU, names.AP, names.AUROC))
    assert all(names.HEADLINE[task] in _computed(task) for task in names.HEADLINE)


def test_the_displays_read_the_stored_keys_by_name() -> None:
    assert names.key(names.VAL, names.F1) == "val/f1_deformation"
    assert Selection.default("segmentation").metric == names.key(names.VAL, names.IOU)
    line = progress_line({"epoch": 2, names.key(names.TRAIN, names.LOSS): 0.5, names.key(names.VAL, names.LOSS): 0.25,
                          names.key(names.VAL, names.F1): 0.75, "time/epoch_s": 3.0, "time/samples_per_s": 10.0}, 4, True)
    assert line.startswith("epoch 2/4  train loss 0.5000  val loss 0.2500  val F1(def) 0.750") and line.endswith("*")
