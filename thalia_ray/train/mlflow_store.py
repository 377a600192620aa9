"""MLflow: one database for every run of an experiment store, `{store}/tracking/mlflow.db` (SQLite).

View it with `mlflow ui --backend-store-uri sqlite:///{store}/tracking/mlflow.db` (an S3 store's file:
copy it to local disk first). Current MLflow opens it as it is; its file stores are in maintenance mode.

The database is a view of the store's records (config, `run.json`, `history.json`, `results.json`),
brought up to date by `sync_mlflow` when a run ends: each run is an MLflow run named after it (tag
`thalia.run_id`), its flattened configuration as params, every epoch's metrics at their epoch, the test
metrics at the last epoch's step, and its status (finished, failed, or killed for a stopped or
interrupted run). A sync only adds what the database lacks, so syncing again changes nothing.

Several drivers may end runs at once (a sweep's concurrent trials, runs on other machines). Each takes
the database's lock (`mlflow.db.lock` beside it: written, read back after a pause, so only one of
several writers keeps it; one left by a driver that died lapses after LOCK_STALE_S), then updates the
database with MLflow's own client: in place on a local disk (SQLite's own locking keeps an open
`mlflow ui` consistent), or in a local copy put back whole on S3, where SQLite cannot write in place.
With `runtime.mlflow.tracking_uri` set, runs go to that tracking server instead.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator

from thalia_ray.storage import Location, StorageError
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import Holder, RunRecord, StoreError
from thalia_ray.train.tracking import TRACKING, final_metrics, numeric, scratch

log = logging.getLogger(__name__)

DATABASE = "mlflow.db"
ARTIFACTS = "mlflow-artifacts"  # the experiments' artifact root, beside the database (nothing is logged there yet)
LOCK_STALE_S = 120.0  # a sync takes seconds; a lock this old was left by a driver that died
LOCK_WAIT_S = 600.0
LOCK_SETTLE_S = 1.0
RUN_TAG = "thalia.run_id"
EPOCHS_TAG, RESULTS_TAG = "thalia.epochs", "thalia.results_logged"
# MLflow's batch limits (log_batch): metrics and params per request.
METRICS_PER_BATCH, PARAMS_PER_BATCH = 1000, 100
STATUS = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED",
          "interrupted": "KILLED"}


def database(store: ExperimentStore) -> Location:
    return store.root.join(TRACKING, DATABASE)


def view_command(store: ExperimentStore) -> str:
    """The one command that opens the store's MLflow database (after copying it, for an S3 store)."""
    db = database(store)
    if db.protocol == "file":
        return f"mlflow ui --backend-store-uri sqlite:///{db.path}"
    return f"aws s3 cp {db.url} mlflow.db && mlflow ui --backend-store-uri sqlite:///mlflow.db"


def sync_mlflow(store: ExperimentStore, run_ids: Iterable[str]) -> int:
    """Bring these runs' MLflow records up to date with the store; returns how many runs were written.

    Runs configured with a tracking server go there; the others into the store's database.
    """
    records = [store.run(run_id) for run_id in run_ids]
    servers: dict[str | None, list[RunRecord]] = {}
    for record in records:
        servers.setdefault(record.read_config().runtime.mlflow.tracking_uri, []).append(record)
    written = 0
    with _quiet_migrations():
        for uri, group in servers.items():
            if uri is not None:
                written += _write_runs(uri, group, artifacts=None)
                continue
            db = database(store)
            with _locked(db), _working_copy(db) as path:
                written += _write_runs(f"sqlite:///{path}", group, artifacts=db.parent().join(ARTIFACTS).url)
    return written


# ------------------------------------------------------------------------------------ writing
def _write_runs(uri: str, records: list[RunRecord], artifacts: str | None) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return sum(_write_run(client, record, artifacts) for record in records)


def _write_run(client: Any, record: RunRecord, artifacts: str | None) -> bool:
    """Add what the database lacks of one run; False when it had everything already."""
    from mlflow.entities import Metric, Param, RunTag

    from thalia_ray.config import flatten

    cfg, status = record.read_config(), record.read_status()
    history, results = record.read_history(), record.read_results()
    experiment = client.get_experiment_by_name(cfg.runtime.mlflow.experiment)
    experiment_id = (experiment.experiment_id if experiment is not None
                     else client.create_experiment(cfg.runtime.mlflow.experiment, artifact_location=artifacts))
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{record.run_id}'")
    if found:
        run_id, tags, params = found[0].info.run_id, found[0].data.tags, found[0].data.params
    else:
        run = client.create_run(experiment_id, run_name=record.run_id, start_time=_millis(status.get("created")),
                                tags={RUN_TAG: record.run_id, "thalia.sweep": status.get("sweep") or ""})
        run_id, tags, params = run.info.run_id, {}, {}
    logged = int(tags.get(EPOCHS_TAG, 0))
    now = int(time.time() * 1000)
    metrics = [Metric(name, value, now, int(row.get("epoch", i + 1)))
               for i, row in enumerate(history[logged:], start=logged) for name, value in numeric(row).items()]
    final = final_metrics(results) if tags.get(RESULTS_TAG) != "yes" else {}
    metrics += [Metric(name, value, now, len(history)) for name, value in final.items()]
    new_params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in params]
    state = STATUS.get(str(status.get("status")), "RUNNING")
    if not metrics and not new_params and found and found[0].info.status == state:
        return False
    for start in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])
    for start in range(0, len(new_params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new_params[start:start + PARAMS_PER_BATCH])
    client.log_batch(run_id, tags=[RunTag(EPOCHS_TAG, str(len(history))), RunTag("thalia.status", str(status.get("status"))),
                                   RunTag(RESULTS_TAG, "yes" if final or tags.get(RESULTS_TAG) == "yes" else "no")])
    if state != "RUNNING":
        client.set_terminated(run_id, state, end_time=_millis(status.get("updated")))
    return True


def _millis(stamp: Any) -> int | None:
    """An ISO time from a run record as milliseconds since the epoch (what MLflow stores)."""
    try:
        return int(datetime.fromisoformat(str(stamp)).timestamp() * 1000)
    except ValueError:
        return None


@contextlib.contextmanager
def _quiet_migrations() -> Iterator[None]:
    """MLflow announces creating and migrating its tables at INFO: keep that off the terminal."""
    loggers = [logging.getLogger(name) for name in ("alembic", "mlflow.store.db.utils")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ------------------------------------------------------------------------------------ database
@contextlib.contextmanager
def _working_copy(db: Location) -> Iterator[Path]:
    """The database as a local file: itself on a local disk, else a copy that is put back whole."""
    if db.protocol == "file":
        Path(db.path).parent.mkdir(parents=True, exist_ok=True)
        yield Path(db.path)
        return
    with scratch("mlflow") as local:
        copy = local / DATABASE
        if db.exists():
            copy.write_bytes(db.read_bytes())
        yield copy
        db.put_file(copy)


def _holder(lock: Location) -> Holder | None:
    try:
        return Holder(**lock.read_json())
    except FileNotFoundError:
        return None
    except (StorageError, TypeError):  # unreadable: treated as lapsed
        return None


@contextlib.contextmanager
def _locked(db: Location) -> Iterator[None]:
    """Hold the database's lock (see the module docstring) while the block runs."""
    lock = db.parent().join(f"{db.name}.lock")
    mine = Holder.this_process(uuid.uuid4().hex)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        holder = _holder(lock)
        if holder is None or time.time() - holder.heartbeat > LOCK_STALE_S:
            lock.write_json(asdict(Holder(**{**asdict(mine), "heartbeat": time.time()})))
            time.sleep(LOCK_SETTLE_S)  # another writer that read the lock free at the same time writes now too
            holder = _holder(lock)
            if holder is not None and holder.owner == mine.owner:
                break
        if time.monotonic() > deadline:
            who = holder.describe(time.time()) if holder is not None else "another driver"
            raise StoreError(f"{db.url} stayed locked by {who} for {LOCK_WAIT_S:.0f} s")
        time.sleep(random.uniform(0.2, 1.0))
    try:
        yield
    finally:
        held = _holder(lock)
        if held is not None and held.owner == mine.owner:
            lock.remove()
