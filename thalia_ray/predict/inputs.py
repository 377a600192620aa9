"""The one doorway from inference and export into the data layer and the trained run.

Everything `predict` and `export` need from cubes, annotations, normalisation and checkpoints is
imported and adapted here, so a change of the data layer's modules touches this file only.
"""
from __future__ import annotations

from datetime import date
from typing import Any, Sequence

import numpy as np

from thalia_ray.config import ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationError, find_metadata, load_annotations, load_timeseries
from thalia_ray.data.cube import Cube, DataError, Window, get_cache
from thalia_ray.data.index import Group, build_groups, enumerated_positions, series_label
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.pairs import existing_pairs, frame_ids, series_key
from thalia_ray.data.transforms import Statistics, normalize, statistics_for
from thalia_ray.storage import Location, S3Options
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import StoreError
from thalia_ray.train.checkpoint import check_state
from thalia_ray.train.evaluate import autocast, gpu_wanted, load_model, model_from_config

__all__ = [
    "AnnotationError", "Cube", "autocast", "gpu_wanted", "DataError", "Group", "Statistics", "Window", "annotated_groups",
    "enumerated_positions", "existing_pairs", "frame_ids", "load_model", "model_from_config", "normalize",
    "open_cube", "read_stack", "run_checkpoint", "run_statistics", "schema", "series_key", "series_label",
]

ALL_DATES = {"all": (date(1900, 1, 1), date(2200, 12, 31))}  # every primary date, one "split"


def open_cube(root: str | Location, frame_id: str) -> Cube:
    """The process-wide opened cube `{root}/{frame_id}.zarr` (a DataError names a missing one)."""
    return get_cache(root).get(frame_id)


def read_stack(cube: Cube, primary: str, secondaries: Sequence[str], channels: Sequence[str]) -> np.ndarray:
    """float32 (T, C, H, W) of a whole frame; a DataError names the cube, dates and variable that fail."""
    p, s = cube.positions(primary, secondaries)
    height, width = cube.shape
    values = cube.read_many(list(channels), p, s, Window(0, 0, height, width))
    arrays = []
    for variable, value in zip(channels, values):
        where = f"cube {cube.url}: variable {variable!r}, dates {primary}/{list(secondaries)}"
        if isinstance(value, BaseException):
            raise DataError(f"{where}: read failed ({type(value).__name__}: {value})") from value
        if np.isnan(value).any():
            raise DataError(f"{where}: {int(np.isnan(value).sum())} NaN values (missing pair or no data)")
        arrays.append(value)
    return np.stack(arrays, axis=1).astype(np.float32, copy=False)


def annotated_groups(root: str | Location, frames: Sequence[str] | None) -> list[Group]:
    """Every (frame, primary) group of the dataset's time-series index, whatever its split."""
    ann_loc, ts_loc, _ = find_metadata(root)
    groups, _ = build_groups(load_annotations(ann_loc), load_timeseries(ts_loc), ALL_DATES, frames)
    return groups


def run_checkpoint(store: ExperimentStore, run_id: str) -> tuple[ThaliaConfig, Any, dict[str, Any]]:
    """(config, best checkpoint, results) of a finished run."""
    from ray.train import Checkpoint

    record = store.existing_run(run_id)
    cfg, results = record.read_config(), record.read_results()
    if not results or not results.get("best_checkpoint"):
        raise StoreError(f"run {run_id} has no best checkpoint in its results (has it finished?)")
    filesystem, _ = store.ray_storage()
    checkpoint = Checkpoint(results["best_checkpoint"], filesystem=filesystem)
    check_state(checkpoint)  # a damaged or hostile one is refused here, not in every model actor
    return cfg, checkpoint, results


def run_statistics(cfg: ThaliaConfig) -> Statistics | None:
    """The normalisation statistics the run trained with (None when it did not normalise)."""
    return statistics_for(DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics) if cfg.data.normalize else None
