"""The experiment store: run records, sweep summaries and Ray's own storage under one location."""
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import (
    RunRecord,
    RunSummary,
    StoreError,
    SweepRecord,
    format_run,
    format_runs_table,
    run_document,
)

__all__ = ["ExperimentStore", "RunRecord", "RunSummary", "StoreError", "SweepRecord", "format_run",
           "format_runs_table", "run_document"]
