"""Every configured tracker brought up to date with a run's records once the run has ended.

Called by the run's driver when the run finishes or fails, and by a sweep's driver for the trials its
scheduler stopped (Ray kills their own drivers). See `tracking` for why the trackers are written from
the records, and `mlflow_store` for MLflow's one database per store.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from thalia_ray.storage import StorageError
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.train.mlflow_store import sync_mlflow
from thalia_ray.train.tracking import TENSORBOARD, WANDB, tensorboard_outcome, wandb_outcome

log = logging.getLogger(__name__)


def track_outcome(store: ExperimentStore, run_id: str) -> None:
    """TensorBoard's test metrics and session end, the whole W&B run, the run in MLflow: each tracker the
    run's configuration lists. Tracking never fails a run: a tracker that cannot write is a warning."""
    record = store.run(run_id)
    try:
        cfg = record.read_config()
        status = str(record.read_status().get("status"))
        history, results = record.read_history(), record.read_results()
    except (StorageError, OSError, ValueError) as err:
        log.warning("run %s: trackers not updated, its records cannot be read: %s", run_id, err)
        return
    wanted = set(cfg.runtime.tracking)
    if TENSORBOARD in wanted:
        _guarded(run_id, TENSORBOARD, lambda: tensorboard_outcome(record, status, history, results))
    if WANDB in wanted and cfg.runtime.wandb.mode != "disabled":
        _guarded(run_id, "W&B", lambda: wandb_outcome(record, cfg, status, history, results))
    if "mlflow" in wanted:
        _guarded(run_id, "MLflow", lambda: sync_mlflow(store, [run_id]))


def _guarded(run_id: str, tracker: str, write: Callable[[], Any]) -> None:
    """Run one tracker's writer; a failure is a warning (the run's records are complete without it)."""
    try:
        write()
    except Exception as err:  # noqa: BLE001 - any tracker failure (its own errors, storage) is only a warning
        log.warning("run %s: %s not updated: %s: %s", run_id, tracker, type(err).__name__, err)
