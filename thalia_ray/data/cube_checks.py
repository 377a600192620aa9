"""What a run on the cubes needs, checked from metadata before any Ray work (the cube source's preflight,
`CubeSource.preflight`): the index, the cube headers, the variables a sample reads and the crop.

Each check reads only metadata (annotation and time-series files, cube headers, one chunk's existence per
variable), several cubes at a time; every failure is a ThaliaError naming the field and the location.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from zarr.core.sync import sync

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationError
from thalia_ray.data.cube import CubeCache, DataError
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.locations import location_present
from thalia_ray.data.samples import Sample
from thalia_ray.storage import S3Options, resolve

_CUBE_THREADS = 8  # cube headers are small reads; S3 latency dominates, so read several at once


def sample_index(cfg: ThaliaConfig) -> SampleIndex:
    """The dataset's index, after checking that `data.root` exists (its metadata are read here)."""
    root = location_present(cfg.data.root, "data.root", S3Options.of(cfg.storage))
    try:
        return SampleIndex.from_config(cfg.data, cfg.seed, location=root)
    except AnnotationError as err:
        raise AnnotationError(f"data.root: {err}") from None


def cube_shapes(cfg: ThaliaConfig, samples: Sequence[Sample], channels: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(height, width) of each frame's cube, read from the cube headers, after checking every cube holds
    `channels` and the mask (a missing cube or variable is a DataError) and that each of them holds data
    (`empty_variables`, probed at `samples`: one per frame)."""
    cache = CubeCache(resolve(cfg.data.root, S3Options.of(cfg.storage)))
    wanted = [*channels, schema.MASK_VAR]

    def header(sample: Sample) -> tuple[tuple[int, int], list[str]]:
        return cache.get(sample.frame_id).shape, cache.missing_variables(sample.frame_id, wanted)

    with ThreadPoolExecutor(min(_CUBE_THREADS, max(len(samples), 1))) as pool:
        headers = dict(zip([s.frame_id for s in samples], pool.map(header, samples)))
        variables_present(cfg, cache, {frame: missing for frame, (_, missing) in headers.items() if missing},
                          len(samples))
        empty = dict(zip([s.frame_id for s in samples], pool.map(lambda s: empty_variables(cache, s, wanted), samples)))
    variables_hold_data(cache, {frame: variables for frame, variables in empty.items() if variables})
    return {frame: shape for frame, (shape, _) in headers.items()}


def empty_variables(cache: CubeCache, sample: Sample, variables: Sequence[str]) -> list[str]:
    """Those of `variables` whose array in `sample`'s cube holds no chunk at all: an all-NaN (or all-fill)
    array, whose chunks Zarr never writes, would fail every sample of the frame after Ray starts.

    One existence check per variable, of the chunk under `sample`'s pair at the frame centre; only when it
    is absent (a sparse cube may lack a pair) is the array listed for any chunk. Variables read through
    xarray's decoding, and those declared to read unwritten chunks as the fill value, are left to the reads.
    """
    cube = cache.get(sample.frame_id)
    store = cache.stores[sample.frame_id]
    primary, secondaries = cube.positions(sample.primary_date, sample.secondary_dates[:1])
    height, width = cube.shape
    centre = {schema.PRIMARY_DIM: primary, schema.SECONDARY_DIM: secondaries[0],
              cube.spatial_dims[0]: height // 2, cube.spatial_dims[1]: width // 2}
    checked = [v for v in variables if v in cube.arrays and v not in getattr(store, "fill_ok", ())]

    def chunk_key(variable: str) -> str:
        array = cube.arrays[variable]
        index = [centre.get(dim, 0) for dim in cube.dataset[variable].dims]
        return f"{variable}/" + array.metadata.encode_chunk_key(tuple(i // c for i, c in zip(index, array.chunks)))

    async def any_chunk(variable: str) -> bool:
        if await store.exists(chunk_key(variable)):
            return True
        async for key in store.list_prefix(f"{variable}/"):
            if key.rsplit("/", 1)[-1] not in ("zarr.json", ".zarray", ".zattrs"):
                return True
        return False

    async def probe() -> list[bool]:
        return list(await asyncio.gather(*(any_chunk(v) for v in checked)))

    return [v for v, here in zip(checked, sync(probe())) if not here]


def variables_hold_data(cache: CubeCache, empty: dict[str, list[str]]) -> None:
    """Refuse cubes with a variable that holds no data (`empty`: frame → such variables), naming them."""
    if not empty:
        return
    frame = min(empty)
    others = f" (and {len(empty) - 1} other cube(s))" if len(empty) > 1 else ""
    raise DataError(f"cube {cache.get(frame).url}{others}: variable(s) {empty[frame]} hold no data at all: every "
                    "chunk is missing (an all-NaN array, whose chunks Zarr never writes), so every sample of the "
                    f"frame would fail. Rewrite the cube, or leave the frame out with data.frames")


def _variable_setting(cfg: ThaliaConfig, variable: str) -> str:
    """The setting that makes a run read `variable`, so the message says what to change."""
    if variable == schema.MASK_VAR:
        return "the labels"
    if variable not in cfg.data.channels:
        return "--all-channels"
    return "data.geomorphology" if variable in schema.GEOMORPHOLOGY else "data.atmospheric"


def variables_present(cfg: ThaliaConfig, cache: CubeCache, lacking: dict[str, list[str]], total: int) -> None:
    """Refuse cubes that lack a variable a sample reads (`lacking`: frame → its missing variables): each
    sample would otherwise fail on its own, after Ray starts, and be skipped or end the run."""
    if not lacking:
        return
    variables = sorted({v for missing in lacking.values() for v in missing})
    settings = " and ".join(sorted({_variable_setting(cfg, v) for v in variables}))
    frame = min(lacking)
    raise DataError(f"{len(lacking)} of {total} cube(s) lack variable(s) {variables} read for {settings}, "
                    f"e.g. cube {cache.get(frame).url} has no {lacking[frame]}")


def crop_fits(crop: int, shapes: dict[str, tuple[int, int]]) -> None:
    small = {frame: shape for frame, shape in shapes.items() if crop > min(shape)}
    if small:
        listed = ", ".join(f"{frame} ({h}x{w})" for frame, (h, w) in sorted(small.items()))
        raise ConfigError(f"data.crop {crop} is larger than {len(small)} frame(s): {listed}")


def cube_pools(cfg: ThaliaConfig, splits: Sequence[str], channels: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """Each split's samples from the cubes, after checking the cubes they need open, hold `channels`
    (default: the configured ones) and the mask, and fit the crop."""
    index = sample_index(cfg)
    pools = {split: index.samples(split) for split in splits}
    first = {}  # the first sample of each frame, in index order
    for sample in (s for pool in pools.values() for s in pool):
        first.setdefault(sample.frame_id, sample)
    shapes = cube_shapes(cfg, [first[f] for f in sorted(first)], cfg.data.channels if channels is None else channels)
    crop_fits(cfg.data.crop, shapes)
    return pools
