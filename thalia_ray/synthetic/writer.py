"""Writing synthetic minicubes (Zarr v3, consolidated) and the dataset's JSON side files.

Arrays are created empty and only the chunks of existing (primary, secondary) pairs are written,
so the sparse date grid costs nothing on disk. Every chunk of an existing pair is written, even an
all-zero mask chunk, because readers refuse chunks that were never written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from thalia_ray.data import schema
from thalia_ray.data.stats import Moments
from thalia_ray.storage import Location

EPOCH = np.datetime64("1970-01-01", "D")
PAIR_DIMS = (schema.PRIMARY_DIM, schema.SECONDARY_DIM, schema.Y_DIM, schema.X_DIM)
COMPRESSOR = ZstdCodec(level=3, checksum=False)  # fixed settings: identical inputs give identical bytes
LONG_NAMES = {
    "insar_difference": "wrapped interferometric phase",
    "insar_coherence": "interferometric coherence (0-255)",
    "dem": "surface height",
    "total_column_water_vapour": "total column water vapour",
    "surface_pressure": "surface pressure",
    "vertical_integral_of_temperature": "vertical integral of temperature",
    schema.MASK_VAR: "deformation mask (0 none, 1 volcanic, 2 earthquake)",
}


def chunk_side(size: int) -> int:
    """Spatial chunk side: ≤ 128 px keeps a 512-px training crop to a few chunks per read."""
    return min(size, 128)


def pair_variables() -> dict[str, np.dtype]:
    names = {"insar_difference": np.float32, "insar_coherence": np.float32, schema.MASK_VAR: np.uint8}
    names.update({c: np.float32 for c in schema.ALL_CHANNELS if c.startswith(("primary_date_", "secondary_date_"))})
    return {k: np.dtype(v) for k, v in names.items()}


def _attrs(name: str) -> dict[str, str]:
    key = schema.statistics_key(name)
    prefix = "primary date " if name.startswith("primary_date_") else "secondary date " if name.startswith(
        "secondary_date_") else ""
    return {"units": schema.UNITS[key], "long_name": prefix + LONG_NAMES[key]}


def _days(days: list[str]) -> np.ndarray:
    stamps = np.array([f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in days], dtype="datetime64[D]")
    return (stamps - EPOCH).astype(np.int64)


class CubeWriter:
    """One `{frame_id}.zarr`: coordinates and static DEM at creation, then one pair at a time."""

    def __init__(self, location: Location, primaries: list[str], secondaries: list[str], size: int,
                 attributes: dict[str, Any]) -> None:
        self.location = location
        self.store = location.zarr_store(read_only=False)
        self.root = zarr.open_group(self.store, mode="w", zarr_format=3, attributes=attributes)
        self.primary_index = {d: i for i, d in enumerate(primaries)}
        self.secondary_index = {d: i for i, d in enumerate(secondaries)}
        time_attrs = {"units": "days since 1970-01-01", "calendar": "proleptic_gregorian"}
        for dim, days in ((schema.PRIMARY_DIM, primaries), (schema.SECONDARY_DIM, secondaries)):
            coord = self.root.create_array(dim, shape=(len(days),), dtype=np.int64, dimension_names=[dim],
                                           attributes={**time_attrs, "long_name": dim.replace("_", " ")},
                                           compressors=COMPRESSOR)
            coord[:] = _days(days)
        for dim in (schema.Y_DIM, schema.X_DIM):
            coord = self.root.create_array(dim, shape=(size,), dtype=np.int32, dimension_names=[dim],
                                           attributes={"units": "1", "long_name": f"pixel {dim}"}, compressors=COMPRESSOR)
            coord[:] = np.arange(size, dtype=np.int32)
        c = chunk_side(size)
        self.arrays = {}
        for name, dtype in pair_variables().items():
            self.arrays[name] = self.root.create_array(
                name, shape=(len(primaries), len(secondaries), size, size), chunks=(1, 1, c, c), dtype=dtype,
                fill_value=0 if dtype == np.uint8 else np.nan, dimension_names=list(PAIR_DIMS),
                attributes=_attrs(name), compressors=COMPRESSOR,
                config={"write_empty_chunks": True})  # an all-zero mask chunk is data: readers refuse unwritten ones
        self.dem = self.root.create_array("dem", shape=(size, size), chunks=(c, c), dtype=np.float32,
                                          fill_value=np.nan, dimension_names=[schema.Y_DIM, schema.X_DIM],
                                          attributes=_attrs("dem"), compressors=COMPRESSOR)

    def write_dem(self, dem: np.ndarray) -> None:
        self.dem[:] = dem.astype(np.float32)

    def write_pair(self, primary: str, secondary: str, fields: dict[str, np.ndarray]) -> None:
        i, j = self.primary_index[primary], self.secondary_index[secondary]
        for name, array in self.arrays.items():
            array[i, j] = fields[name]

    def close(self) -> None:
        """Consolidate metadata (one read opens the cube); zarr warns that v3 has no spec for it yet."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.store)


@dataclass
class DatasetMoments:
    """Per statistics.json key (ERA5 primary and secondary share one entry, as published)."""

    by_key: dict[str, Moments] = field(default_factory=dict)

    def add(self, channel: str, values: np.ndarray) -> None:
        self._merge(schema.statistics_key(channel), Moments.of(values))

    def add_repeated(self, channel: str, values: np.ndarray, times: int) -> None:
        """A static channel counted once per pair (as in the published per-sample statistics)."""
        one = Moments.of(values)
        self._merge(schema.statistics_key(channel), Moments(one.count * times, one.mean, one.m2 * times))

    def merge(self, other: "DatasetMoments") -> None:
        for key, moments in other.by_key.items():
            self._merge(key, moments)

    def _merge(self, key: str, moments: Moments) -> None:
        self.by_key[key] = self.by_key.get(key, Moments()).merge(moments)

    def statistics(self) -> dict[str, dict[str, float]]:
        order = [schema.statistics_key(c) for c in schema.ALL_CHANNELS]
        keys = list(dict.fromkeys(k for k in order if k in self.by_key))
        return {k: {"mean": self.by_key[k].mean, "std": self.by_key[k].std} for k in keys}


def write_side_files(root: Location, annotations: dict[str, dict], timeseries: dict[str, dict],
                     statistics: dict[str, dict[str, float]], frame_names: dict[str, str]) -> None:
    """annotations.json, quality_timeseries.json, statistics.json and frame_names.json, as published."""
    root.join(schema.ANNOTATIONS_FILE).write_json(annotations)
    root.join(schema.TIMESERIES_FILE).write_json(timeseries)
    root.join(schema.STATISTICS_FILE).write_json(statistics)
    root.join(schema.FRAME_NAMES_FILE).write_json(frame_names)
