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
from thalia_ray.tables import Table


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


@dataclass(frozen=True)
class ChunkingReport:
    """What `thalia-ray prepare chunking` tells: a cube's cost per sample as chunked, and with other
    spatial chunk sides (same chunking along the dates)."""

    cube: str
    crop: int
    length: int
    current: list[VariableCost]
    alternatives: dict[int, list[VariableCost]]

    def tables(self) -> list[Table]:
        mib = 2 ** 20
        rows = [[c.name, "x".join(map(str, c.chunks)), round(c.gets, 1), round(c.bytes / mib, 2)] for c in self.current]
        rows.append(["total", "", round(sum(c.gets for c in self.current), 1),
                     round(sum(c.bytes for c in self.current) / mib, 2)])
        title = f"cube {self.cube}, crop {self.crop}, T={self.length}: expected per sample, crop placed at random"
        other = [[f"{side}²", round(sum(c.gets for c in costs), 1), round(sum(c.bytes for c in costs) / mib, 2)]
                 for side, costs in self.alternatives.items()]
        return [Table(["variable", "chunks", "GETs", "MiB"], rows, title),
                Table(["spatial chunk", "GETs", "MiB"], other, "with other spatial chunk sides")]


def chunking_report(cube: Any, variables: Sequence[str], crop: int, length: int) -> ChunkingReport:
    """The cost report of an open cube (`data.cube.OpenCube`) for a run reading `variables` (channels
    and the mask) in crops of `crop` pixels, series of `length`."""
    arrays = {v: cube.arrays[v] for v in variables if v in cube.arrays}
    if len(arrays) < len(variables):
        raise ValueError(f"cube {cube.url}: variables {sorted(set(variables) - set(arrays))} are not plain Zarr arrays")
    return ChunkingReport(cube.url, crop, length, sample_cost(cube.dataset, arrays, variables, crop, length),
                          {side: sample_cost(cube.dataset, arrays, variables, crop, length, side)
                           for side in spatial_alternatives(min(cube.shape), crop)})
