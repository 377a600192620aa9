"""Rewrite a dataset's cubes with another spatial chunk side (`thalia-ray prepare rechunk`).

From object storage a sample costs one GET per chunk under its crop (`data/chunking.py`); a cube
chunked finely for other uses can be rewritten once with chunks about the crop's size, so that training
reads it with a few larger requests. Everything else is kept as it is: array names, dtypes, fill values,
codecs, attributes and dimension names, the chunking along the dates, and the sparse date grid (only
the planes of pairs that were written are written again, so readers still refuse the others). The
dataset's other files (annotations, index, statistics) are copied beside the cubes.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from thalia_ray.data import schema
from thalia_ray.storage import Location

_DATES = (schema.PRIMARY_DIM, schema.SECONDARY_DIM)


@dataclass
class RechunkReport:
    cubes: list[str] = field(default_factory=list)
    planes: int = 0  # (primary, secondary) planes copied
    files: list[str] = field(default_factory=list)  # other files copied
    seconds: float = 0.0


async def _keys(store: Any, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


def written_pairs(store: Any, name: str, array: zarr.Array) -> list[tuple[int, int]]:
    """The (primary, secondary) positions whose chunks `array` holds (v3 `name/c/p/s/...` keys)."""
    step_p, step_s = array.chunks[0], array.chunks[1]
    pairs = set()
    for key in sync(_keys(store, f"{name}/c/")):
        p, s = (int(v) for v in key[len(name) + 3:].split("/")[:2])
        pairs.update((pp, ss) for pp in range(p * step_p, min((p + 1) * step_p, array.shape[0]))
                     for ss in range(s * step_s, min((s + 1) * step_s, array.shape[1])))
    return sorted(pairs)


def rechunk_cube(source: Location, target: Location, side: int) -> int:
    """Copy one cube with spatial chunks of `side` (capped at the frame); returns the planes copied."""
    src_store = source.zarr_store(read_only=True)
    src = zarr.open_group(src_store, mode="r")
    dst = zarr.open_group(target.zarr_store(read_only=False), mode="w", attributes=src.attrs.asdict())
    planes = 0
    for name, array in src.arrays():
        dims = tuple(array.metadata.dimension_names or ())
        spatial = [i for i, d in enumerate(dims) if d not in _DATES]
        chunks = list(array.chunks)
        if len(spatial) == 2:
            for i in spatial:
                chunks[i] = min(side, array.shape[i])
        new = dst.create_array(name, shape=array.shape, chunks=tuple(chunks), dtype=array.dtype,
                               fill_value=array.fill_value, dimension_names=dims or None,
                               attributes=array.attrs.asdict(), compressors=array.compressors,
                               filters=array.filters, config={"write_empty_chunks": True})
        if dims[:2] == _DATES and len(spatial) == 2:
            for p, s in written_pairs(src_store, name, array):
                new[p, s] = array[p, s]
                planes += 1
        else:
            new[...] = np.asarray(array[...])
    with warnings.catch_warnings():  # consolidated metadata: what xarray reads first, outside the v3 spec
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(target.zarr_store(read_only=False))
    return planes


def rechunk_dataset(source: Location, target: Location, side: int, frames: list[str]) -> RechunkReport:
    """Every cube of `frames` rewritten with spatial chunks of `side`, the dataset's other files copied."""
    started = time.perf_counter()
    report = RechunkReport()
    for frame in frames:
        name = f"{frame}{schema.CUBE_SUFFIX}"
        report.planes += rechunk_cube(source.join(name), target.join(name), side)
        report.cubes.append(name)
    for name in source.list():
        if not name.endswith(schema.CUBE_SUFFIX) and not source.join(name).is_dir():
            target.join(name).write_bytes(source.join(name).read_bytes())
            report.files.append(name)
    report.seconds = time.perf_counter() - started
    return report
