"""The predict output: probability cubes aligned with the input, per-unit completion records, a table.

```
{out}/{frame_id}.zarr       deformation_probability, float16 in [0, 1], NaN where nothing was predicted
                            T = 1: (primary_date, secondary_date, y, x), the input cube's own grid
                            T > 1: (series, y, x) with primary_date(series), secondary_date(series, step)
{out}/done/{frame_id}/{key}.json   one completion record per unit: its table row (written last, atomically)
{out}/predictions.parquet   one row per unit: frame, dates, max probability, area above threshold, labels
{out}/evaluation.json       whole-frame AP and F1 per frame and overall, where annotations exist
{out}/failed.json           the units of the last run that could not be read, each with its reason
```
A unit counts as complete only once its record exists; the record is written after its probability
map, so a job killed in between redoes that unit and overwrites the same region.
"""
from __future__ import annotations

import json
import warnings
from datetime import date
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr
import zarr

from thalia_ray.predict import inputs
from thalia_ray.predict.plan import Unit
from thalia_ray.storage import Location, local

VARIABLE = "deformation_probability"
SERIES_DIM, STEP_DIM = "series", "step"
TABLE, EVALUATION, FAILED, DONE = "predictions.parquet", "evaluation.json", "failed.json", "done"
MAX_CHUNK = 512
TABLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("frame_id", pa.string()), ("primary_date", pa.date32()),
    ("secondary_dates", pa.list_(pa.date32())), ("max_probability", pa.float32()),
    ("area_above_threshold", pa.int64()), ("predicted_label", pa.int8()), ("annotated_label", pa.int8()),
])


class FrameOutput:
    """The output cube of one frame, created on first use from the input cube's coordinates."""

    def __init__(self, out: Location, cube: inputs.Cube, units: Sequence[Unit], length: int) -> None:
        self.location = out.join(f"{cube.frame_id}{inputs.schema.CUBE_SUFFIX}")
        self.length = length
        self.slots = self._slots(cube, units)
        store = self.location.zarr_store(read_only=False)
        if not self.location.join("zarr.json").exists():
            self._create(store, cube, units)
        group = zarr.open_group(store, mode="r+")
        if length > 1 and group.attrs.get("series_keys") != [u.key for u in units]:
            raise ValueError(f"{self.location} holds other series than this job plans (another --pairs, --frames "
                             f"or run?); write to a new --out")
        self.array = group[VARIABLE]

    def _slots(self, cube: inputs.Cube, units: Sequence[Unit]) -> dict[str, tuple[int, ...]]:
        if self.length == 1:
            return {u.key: (cube.primary_index[u.primary_date], cube.secondary_index[u.secondary_dates[0]])
                    for u in units}
        return {u.key: (i,) for i, u in enumerate(units)}

    def _create(self, store: Any, cube: inputs.Cube, units: Sequence[Unit]) -> None:
        ydim, xdim = cube.spatial_dims
        source = cube.dataset
        height, width = cube.shape
        if self.length == 1:
            coords = xr.Dataset(coords={d: source[d] for d in (inputs.schema.PRIMARY_DIM, inputs.schema.SECONDARY_DIM,
                                                                ydim, xdim)})
            dims = (inputs.schema.PRIMARY_DIM, inputs.schema.SECONDARY_DIM, ydim, xdim)
            shape = (len(source[dims[0]]), len(source[dims[1]]), height, width)
        else:
            primaries = np.array([np.datetime64(_iso(u.primary_date), "ns") for u in units])
            secondaries = np.array([[np.datetime64(_iso(s), "ns") for s in u.secondary_dates] for u in units])
            coords = xr.Dataset(coords={
                SERIES_DIM: np.arange(len(units)), ydim: source[ydim], xdim: source[xdim],
                inputs.schema.PRIMARY_DIM: (SERIES_DIM, primaries, source[inputs.schema.PRIMARY_DIM].attrs),
                inputs.schema.SECONDARY_DIM: ((SERIES_DIM, STEP_DIM), secondaries.reshape(len(units), self.length),
                                              source[inputs.schema.SECONDARY_DIM].attrs),
            })
            dims, shape = (SERIES_DIM, ydim, xdim), (len(units), height, width)
        # The input's global attributes (CF `Conventions`, pass direction, pixel spacing, ...) describe this
        # grid too; ours say where it came from.
        coords.attrs = {**source.attrs, "frame_id": cube.frame_id, "source": cube.url, "time_steps": self.length}
        if self.length > 1:
            coords.attrs["series_keys"] = [u.key for u in units]  # a rerun must plan the same series
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # xarray's note on zarr v3 consolidated metadata
            coords.to_zarr(store, mode="w", zarr_format=3, consolidated=False)
        group = zarr.open_group(store, mode="r+")
        group.create_array(
            VARIABLE, shape=shape, dtype="float16", fill_value=np.nan, dimension_names=dims,
            chunks=(1,) * (len(dims) - 2) + (min(height, MAX_CHUNK), min(width, MAX_CHUNK)),
            attributes={"long_name": "probability of deformation", "units": "1",
                        "description": "float16 in [0, 1]; NaN where no prediction was made"},
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # consolidated metadata is not yet in the v3 spec
            zarr.consolidate_metadata(store)  # the metadata is final: only chunks are written from here on

    def write(self, unit: Unit, probability: np.ndarray) -> None:
        self.array[self.slots[unit.key]] = probability.astype(np.float16, copy=False)


def _iso(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def _date(day: str) -> date:
    """`YYYYMMDD` (the index's and the completion records' form) as a date."""
    return date.fromisoformat(_iso(day))


def summary_row(unit: Unit, probability: np.ndarray, threshold: float) -> dict[str, Any]:
    """The unit's table row: highest probability, pixels at or above the threshold, labels."""
    peak = float(probability.max())
    return {**unit.row(), "max_probability": peak, "area_above_threshold": int((probability >= threshold).sum()),
            "predicted_label": int(peak >= threshold), "annotated_label": unit.label}


def done_location(out: Location, unit: Unit) -> Location:
    return out.join(DONE, unit.frame_id, f"{unit.key}.json")


def completed(out: Location, frames: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{key: row} of every unit with a completion record under the given frames."""
    rows = {}
    for frame in frames:
        folder = out.join(DONE, frame)
        for name in folder.list() if folder.exists() else []:
            if name.endswith(".json"):
                row = folder.join(name).read_json()
                rows[row["key"]] = row
    return rows


def mark_done(out: Location, unit: Unit, row: dict[str, Any]) -> None:
    done_location(out, unit).write_json(row, indent=None)


def write_table(out: Location, rows: Sequence[dict[str, Any]]) -> Location:
    """predictions.parquet of the rows, sorted by key; dates as Arrow dates (pandas, Spark and DuckDB read
    them as dates)."""
    typed = [{**r, "primary_date": _date(r["primary_date"]), "secondary_dates": [_date(d) for d in r["secondary_dates"]]}
             for r in sorted(rows, key=lambda r: r["key"])]
    table = pa.Table.from_pylist(typed, schema=TABLE_SCHEMA)
    location = out.join(TABLE)
    with location.open("wb") as handle:
        pq.write_table(table, handle)
    return location


def read_table(out: str | Location) -> list[dict[str, Any]]:
    with local(out).join(TABLE).open("rb") as handle:
        return pq.read_table(handle).to_pylist()


def write_failures(out: Location, failures: dict[str, str]) -> None:
    out.join(FAILED).write_text(json.dumps(failures, indent=2, sort_keys=True) + "\n")
