"""Where experiment records live: one store location (local folder or `s3://bucket/prefix`).

```
{store}/runs/{run_id}/      our run records (config, status, history, results, predictions)
{store}/sweeps/{sweep_id}/  sweep summaries
{store}/ray/                Ray Train / Tune storage (checkpoints, trial state), given to RunConfig
```
Run ids are safe as folder names, Ray run names and object keys: letters, digits, `-` and `_`.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
from datetime import datetime, timezone
from typing import Any

from thalia_ray.config import StorageConfig
from thalia_ray.ids import ID, check_id
from thalia_ray.storage import Location, S3Options, StorageError, local, resolve
from thalia_ray.store.records import RunRecord, RunSummary, StoreError, SweepRecord

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
NAME_LIMIT = 48
STORE_ENV = "THALIA_STORE"  # the store of commands given none (job specs have the cluster provide it)


def default_location() -> str:
    """Where commands given no store look: $THALIA_STORE, else the configuration's default (`./runs`)."""
    return os.environ.get(STORE_ENV) or StorageConfig.model_fields["store"].default


def make_run_id(name: str, now: datetime | None = None, token: str | None = None) -> str:
    """`{name}-{YYYYmmdd-HHMMSS}-{6 hex}`: sortable by time, unique, no dots or slashes."""
    stem = _UNSAFE.sub("-", name).strip("-_")[:NAME_LIMIT].strip("-_") or "run"
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}-{token or secrets.token_hex(3)}"


class ExperimentStore:
    """Runs, sweeps and Ray's own storage under one location; local disk and S3 behave the same."""

    def __init__(self, location: str | os.PathLike[str] | Location) -> None:
        """A store at a Location (resolved with the storage settings) or a local path."""
        self.root = local(location)
        self.runs_root = self.root.join("runs")
        self.sweeps_root = self.root.join("sweeps")
        self.ray_root = self.root.join("ray")

    @classmethod
    def of(cls, storage_cfg: StorageConfig) -> "ExperimentStore":
        """The store a configuration names (`storage.store`), reached with its storage settings."""
        return cls(resolve(storage_cfg.store, S3Options.of(storage_cfg)))

    def __repr__(self) -> str:
        return f"ExperimentStore({self.root.url!r})"

    @staticmethod
    def new_run_id(name: str) -> str:
        return make_run_id(name)

    def run(self, run_id: str) -> RunRecord:
        """The record of `run_id` (it need not exist yet: writing creates it)."""
        return RunRecord(self.runs_root.join(check_id(run_id)))

    def existing_run(self, run_id: str) -> RunRecord:
        """The record of a run that must already exist, e.g. for `runs show ID`."""
        record = self.run(run_id)
        if not record.exists():
            raise StoreError(f"no run {run_id!r} in {self.runs_root}")
        return record

    def sweep(self, sweep_id: str) -> SweepRecord:
        return SweepRecord(self.sweeps_root.join(check_id(sweep_id, "sweep id")))

    def existing_sweep(self, sweep_id: str) -> SweepRecord:
        """The record of a sweep that must already exist, e.g. for `leaderboard SWEEP_ID`."""
        record = self.sweep(sweep_id)
        if not record.exists():
            raise StoreError(f"no sweep {sweep_id!r} in {self.sweeps_root}")
        return record

    def run_ids(self) -> list[str]:
        return [name for name in self.runs_root.list() if ID.match(name)]

    def list_runs(self, sweep: str | None = None) -> list[RunSummary]:
        """Every run (newest first), or only the trials of `sweep`; a broken record is listed as unreadable."""
        summaries = []
        for run_id in self.run_ids():
            try:
                summary = self.run(run_id).summary()
            except (StorageError, StoreError):  # `runs show ID` gives the reason
                summary = RunSummary(run_id, run_id, "unreadable", "?", None, None, None, None, None, None, None)
            if sweep is None or summary.sweep == sweep:
                summaries.append(summary)
        return sorted(summaries, key=lambda s: (s.created or "", s.run_id), reverse=True)

    def existing_runs(self) -> list[RunSummary]:
        """`list_runs()`, where a store holding no run is an error: a mistyped store location must not
        read as an empty result."""
        summaries = self.list_runs()
        if not summaries:
            raise StoreError(f"no runs in {self.root.url}: is the store location (--store, {STORE_ENV}) right?")
        return summaries

    def reconcile_runs(self, run_id: str | None = None) -> list[str]:
        """Mark `running` runs whose driver is gone (all, or `run_id`) as interrupted; returns their ids.
        A damaged record is left as it is (listings show it as unreadable, `runs show` says why)."""
        marked = []
        for i in [run_id] if run_id else self.run_ids():
            try:
                if self.run(i).reconcile() is not None:
                    marked.append(i)
            except StoreError as err:
                if run_id:
                    raise
                log.debug("run %s left as it is: %s", i, err)
        return marked

    def ray_storage(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path) for `RunConfig(storage_filesystem=..., storage_path=...)`."""
        self.ray_root.makedirs()
        return self.ray_root.pyarrow()
