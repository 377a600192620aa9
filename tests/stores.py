"""Experiment stores built by hand: run and sweep records written through the store's own API, as
training and the Tune driver write them, with predictions for the real test samples of a dataset root.

They stand in for minutes of Ray Train where a test is about what is done with the records (ranking,
reports, tables), and let a test choose the numbers: e.g. a validation-best run that is not the test-best.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from thalia_ray.config import ThaliaConfig
from thalia_ray.store import ExperimentStore, RunRecord


def headline_metric(task: str) -> str:
    """The Deformation metric a task's leaderboard shows first (without its split prefix)."""
    return "f1_deformation" if task == "classification" else "iou_deformation"


def write_run(store: ExperimentStore, root: Path | str, run_id: str, *, task: str = "classification",
              length: int = 1, val: Sequence[float] = (0.2, 0.4, 0.6), test: float = 0.5, lr: float = 1e-3,
              seed: int = 0, sweep: str | None = None, sweep_config: Mapping[str, Any] | None = None,
              stopped: bool = False, checkpoint: bool = False, restart_at: int | None = 3,
              model: str | None = None) -> RunRecord:
    """One run: an epoch per `val` value (the task's validation headline metric), then, unless
    `stopped` (by the sweep scheduler), test predictions of `root`'s test samples and results with
    `test` as the test headline metric. `checkpoint`: a best checkpoint holding the model's seeded
    initial weights (what a segmentation gallery reads its probability maps from)."""
    from thalia_ray.data.index import SampleIndex

    metric = headline_metric(task)
    cfg = ThaliaConfig.model_validate({
        "name": run_id, "seed": seed, "data": {"root": str(root), "crop": 32, "length": length},
        "model": {"task": task, **({"name": model} if model else {})}, "train": {"lr": lr, "epochs": 3}})
    record = store.run(run_id)
    record.write_config(cfg)
    record.set_status("running", task=task, model=cfg.model.name, sweep=sweep,
                      **({"kind": "sweep-trial", "sweep_config": dict(sweep_config or {})} if sweep else {}))
    record.write_history([{"epoch": e, "train/loss": 1 / e, "val/loss": 1.2 / e, f"val/{metric}": v,
                           "val/ap_deformation": v / 2, "lr": lr / e, "restarts": int(restart_at is not None
                                                                                      and e >= restart_at)}
                          for e, v in enumerate(val, start=1)])
    if stopped:
        record.set_status("stopped", reason="stopped early by the sweep scheduler")
        return record
    rng = np.random.default_rng(seed)
    rows = []
    for sample in SampleIndex.from_config(cfg.data, cfg.seed).samples("test"):
        score = float(0.3 * sample.label + 0.6 * rng.random())  # some of each outcome
        rows.append({"key": sample.key, "frame_id": sample.frame_id, "intensity": "Low", "activity_type": "Sill",
                     "label": sample.label, "score": score, "pred": int(score > 0.5)})
    record.write_predictions("test", rows)
    best = _checkpoint(store, run_id, cfg) if checkpoint else None
    record.write_results({f"test/{metric}": test, "test/precision_deformation": 0.4, "test/f1_non_deformation": 0.9,
                          "test/loss": 0.3, f"val/{metric}": val[-1], "val/loss": 1.2 / len(val)},
                         best_epoch=len(val), best_checkpoint=best, epochs=len(val),
                         restarts=int(restart_at is not None and len(val) >= restart_at))
    record.set_status("finished")
    return record


def _checkpoint(store: ExperimentStore, run_id: str, cfg: ThaliaConfig) -> str:
    import torch

    from thalia_ray.train.checkpoint import save_state
    from thalia_ray.train.evaluate import model_from_config

    torch.manual_seed(cfg.seed)
    folder = Path(store.root.path) / "ray" / run_id / "checkpoint_000000"
    folder.mkdir(parents=True)
    save_state({"model": model_from_config(cfg).state_dict(), "progress": {"epoch": 1}}, folder)
    return str(folder)


def write_sweep(store: ExperimentStore, root: Path | str, sweep_id: str, trials: Mapping[str, Mapping[str, Any]],
                metric: str = "val/f1_deformation", mode: str = "max", seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    """A finished sweep: `trials` maps run ids to `write_run` keywords (their `lr` is the swept value,
    recorded with the constant seed as Tune samples it), summarised by the Tune driver's own code."""
    from thalia_ray.tune.driver import summarise

    for run_id, options in trials.items():
        options = dict(options)
        lr = options.setdefault("lr", 1e-3)
        write_run(store, root, run_id, sweep=sweep_id, sweep_config={"train.lr": lr, "seed": options.get("seed", 0)},
                  **options)
    cfg = ThaliaConfig.model_validate({"sweep": {"name": sweep_id, "metric": metric, "mode": mode,
                                                 "seeds": list(seeds), "space": {"train.lr": {"grid": [1e-3]}}}})
    summary = summarise(store, sweep_id, cfg, [], seconds=12.0)
    store.sweep(sweep_id).write_summary(summary.to_json())
    return summary.to_json()
