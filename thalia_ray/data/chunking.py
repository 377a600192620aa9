"""What a cube's chunking costs a training run that reads it from object storage.

Each Zarr chunk is one object, so one GET: a sample costs, per variable, the chunks its crop touches
in each plane it reads (T planes for a per-pair variable, one for a static one), and each of those
GETs returns a whole chunk. `sample_cost` computes the expected GETs and bytes per sample for a cube's
own chunk shapes with the crop placed uniformly at random (what `thalia-ray prepare chunking` prints),
and `spatial_alternatives` the same for other spatial chunk sides, so the trade (fewer, larger
requests) can be read off before rechunking or exporting shards (docs/object-storage.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from thalia_ray.data import schema


def chunks_per_axis(crop: int, chunk: int, size: int) -> float:
    """Expected number of chunks of side `chunk` that a window of `crop` pixels, placed uniformly at
    random on an axis of `size` pixels, overlaps."""
    crop, chunk = min(crop, size), max(1, min(chunk, size))
    starts = range(size - crop + 1)
    return sum((start + crop - 1) // chunk - start // chunk + 1 for start in starts) / len(starts)


@dataclass(frozen=True)
class VariableCost:
    name: str
    chunks: tuple[int, ...]  # the array's chunk shape
    planes: int  # chunk planes one sample reads (T / pairs per chunk for per-pair variables, 1 if static)
    gets: float  # expected GETs per sample
    bytes: float  # expected bytes fetched per sample (uncompressed chunk size)


def variable_cost(name: str, dims: Sequence[str], shape: Sequence[int], chunks: Sequence[int], itemsize: int,
                  crop: int, length: int) -> VariableCost:
    """One variable's expected GETs and bytes per sample (see the module docstring)."""
    sizes = dict(zip(dims, shape))
    chunk_of = dict(zip(dims, chunks))
    spatial = [d for d in dims if d not in (schema.PRIMARY_DIM, schema.SECONDARY_DIM)]
    per_plane = math.prod(chunks_per_axis(crop, chunk_of[d], sizes[d]) for d in spatial)
    planes = math.ceil(length / chunk_of[schema.SECONDARY_DIM]) if schema.SECONDARY_DIM in dims else 1
    gets = planes * per_plane
    return VariableCost(name, tuple(chunks), planes, gets, gets * math.prod(chunks) * itemsize)


def sample_cost(dataset: Any, arrays: dict[str, Any], variables: Sequence[str], crop: int, length: int,
                spatial_chunk: int | None = None) -> list[VariableCost]:
    """Per variable of `variables` (channels and the mask): its cost per sample; `spatial_chunk`
    replaces the spatial chunk sides (a rechunked cube) when given."""
    costs = []
    for name in variables:
        array = arrays[name]
        dims = list(dataset[name].dims)
        chunks = [spatial_chunk if spatial_chunk and d not in (schema.PRIMARY_DIM, schema.SECONDARY_DIM) else c
                  for d, c in zip(dims, array.chunks)]
        costs.append(variable_cost(name, dims, array.shape, chunks, array.dtype.itemsize, crop, length))
    return costs


def spatial_alternatives(frame: int, crop: int) -> list[int]:
    """Spatial chunk sides worth comparing for a frame side and crop: powers of two from half the crop
    up to the frame, and the whole frame."""
    sides = [2 ** k for k in range(max(5, int(math.log2(max(crop // 2, 1)))), int(math.log2(frame)) + 1)]
    return sorted(set(sides + [frame]))
