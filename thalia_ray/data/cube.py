"""Windowed reads of Thalia minicubes: crop placement, date lookup and reading only what a sample needs.

A frame cube holds every interferogram of a frame (tens of GB for the real data), so a sample must
read only its (primary, secondaries) pairs, its channels and its crop window: the Zarr chunks that
window touches and nothing else. Cubes are opened once per process and kept open.

xarray opens a cube and decodes its coordinates; the reads themselves go straight to the Zarr arrays,
all variables of a sample in one concurrent batch, for every variable whose stored values need no
CF decoding (no scale/offset, float fill values already NaN). Anything else is read through xarray,
so cubes with packed or integer-filled variables read exactly as xarray decodes them.
"""
from __future__ import annotations

import asyncio
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import Annotation
from thalia_ray.data.index import group_rng, sample_rng
from thalia_ray.data.samples import RawSample, Sample, Window
from thalia_ray.data.transforms import mask_target
from thalia_ray.errors import DataProblem
from thalia_ray.storage import Location, local

_METADATA_FILES = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
_ARRAY_METADATA = ("zarr.json", ".zarray")  # an array's own metadata, Zarr v3 and v2
UNWRITTEN_CHUNKS = "unwritten_chunks"  # variable attribute; "fill_value": chunks may be omitted


class DataError(DataProblem, RuntimeError):
    """A sample cannot be read as asked (missing date, NaN values, unreadable chunk).

    The message names the cube, variable, dates and window; the pipeline decides to skip or fail.
    """


# ------------------------------------------------------------------------- storage wrappers
def _chunk_array(key: str) -> str | None:
    """The array a store key holds a chunk of (v3 "var/c/0/1", v2 "var/0.1"), None for metadata."""
    path, _, last = key.rpartition("/")
    if last in _METADATA_FILES or key in _METADATA_FILES:
        return None
    return key.split("/c/")[0] if "/c/" in key else path


class MissingChunkError(LookupError):
    """A chunk the read needs was never written (Zarr would silently return the fill value)."""


class StrictChunks(WrapperStore):
    """Refuses chunks that were never written. Zarr reads them as the fill value, which for the
    mask would turn a damaged positive into "no deformation" and for integer variables into
    plausible numbers; a variable whose attributes say `unwritten_chunks: fill_value` (its cube
    declares unwritten chunks mean the fill value) reads as Zarr does."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.fill_ok: frozenset[str] = frozenset()

    def _check(self, key: str, buffer: Any) -> Any:
        array = _chunk_array(key)
        if buffer is None and array is not None and array not in self.fill_ok:
            raise MissingChunkError(f"chunk {key} was never written")
        return buffer

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        key_ranges = list(key_ranges)
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, buffer) for (key, _), buffer in zip(key_ranges, buffers)]


class CountingStore(WrapperStore):
    """A Zarr store wrapper counting reads, so tests and benchmarks can see what a read fetched."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.chunk_reads: Counter[str] = Counter()  # per array path
        self.bytes_read = 0
        self._lock = threading.Lock()

    def _record(self, key: str, buffer: Any) -> None:
        array = _chunk_array(key)
        if array is None:
            return
        with self._lock:
            self.chunk_reads[array] += 1
            self.bytes_read += len(buffer) if buffer is not None else 0

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        buffer = await self._store.get(key, prototype, byte_range)
        self._record(key, buffer)
        return buffer

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        key_ranges = list(key_ranges)
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buffer in zip(key_ranges, buffers):
            self._record(key, buffer)
        return buffers

    def reset(self) -> None:
        with self._lock:
            self.chunk_reads.clear()
            self.bytes_read = 0


# ----------------------------------------------------------------------------------- cubes
def _date_keys(values: np.ndarray) -> dict[str, int]:
    days = np.datetime_as_string(np.asarray(values).astype("datetime64[D]"), unit="D")
    return {d.replace("-", ""): i for i, d in enumerate(days)}


@dataclass
class Cube:
    """One opened frame cube: date → position maps and the spatial dimensions."""

    frame_id: str
    url: str
    dataset: xr.Dataset
    arrays: dict[str, Any] = field(default_factory=dict)  # variable → zarr AsyncArray read directly
    primary_index: dict[str, int] = field(init=False)
    secondary_index: dict[str, int] = field(init=False)
    spatial_dims: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        for dim in (schema.PRIMARY_DIM, schema.SECONDARY_DIM):
            if dim not in self.dataset.coords:
                raise DataError(f"cube {self.url}: no {dim!r} coordinate (dims: {dict(self.dataset.sizes)})")
        self.primary_index = _date_keys(self.dataset[schema.PRIMARY_DIM].values)
        self.secondary_index = _date_keys(self.dataset[schema.SECONDARY_DIM].values)
        if schema.MASK_VAR not in self.dataset:
            raise DataError(f"cube {self.url}: no {schema.MASK_VAR!r} variable")
        dims = [d for d in self.dataset[schema.MASK_VAR].dims if d not in (schema.PRIMARY_DIM, schema.SECONDARY_DIM)]
        if len(dims) != 2:
            raise DataError(f"cube {self.url}: expected two spatial dimensions besides the dates, got {dims}")
        self.spatial_dims = (dims[0], dims[1])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.dataset.sizes[self.spatial_dims[0]]), int(self.dataset.sizes[self.spatial_dims[1]])

    def positions(self, primary: str, secondaries: Sequence[str]) -> tuple[int, list[int]]:
        """Integer positions of the dates; a DataError names any date the cube does not hold."""
        missing = [d for d in [primary] if d not in self.primary_index]
        missing += [d for d in secondaries if d not in self.secondary_index]
        if missing:
            raise DataError(f"cube {self.url}: dates {missing} not in the cube (sample {primary}/{list(secondaries)})")
        return self.primary_index[primary], [self.secondary_index[s] for s in secondaries]

    def read(self, variable: str, primary: int, secondaries: Sequence[int], window: Window) -> np.ndarray:
        """float32 (T, h, w) of one variable; static and per-pair scalar variables are broadcast."""
        [values] = self.read_many([variable], primary, secondaries, window)
        if isinstance(values, BaseException):
            raise values
        return values

    def read_many(self, variables: Sequence[str], primary: int, secondaries: Sequence[int],
                  window: Window) -> list[np.ndarray | BaseException]:
        """`read` for several variables: the direct ones in one concurrent Zarr batch. A variable
        that fails yields its exception in its place, so the caller can name it."""
        absent = [v for v in variables if v not in self.dataset]
        if absent:
            raise DataError(f"cube {self.url}: no variable(s) {absent}")
        unique, inverse = np.unique(np.asarray(secondaries), return_inverse=True)
        ydim, xdim = self.spatial_dims
        wanted = {
            schema.PRIMARY_DIM: primary,
            schema.SECONDARY_DIM: unique,
            ydim: slice(window.row, window.row + window.height),
            xdim: slice(window.col, window.col + window.width),
        }
        direct = [v for v in variables if v in self.arrays]
        fetched = dict(zip(direct, sync(_gather([
            self.arrays[v].get_orthogonal_selection(tuple(wanted[d] for d in self.dataset[v].dims)) for v in direct
        ])))) if direct else {}
        out: list[np.ndarray | BaseException] = []
        for variable in variables:
            dims = [d for d in self.dataset[variable].dims if d != schema.PRIMARY_DIM]
            values = fetched[variable] if variable in fetched else _read_decoded(self.dataset[variable], wanted)
            out.append(values if isinstance(values, BaseException)
                       else _to_series(np.asarray(values), dims, inverse, window, ydim))
        return out


def _read_decoded(data: xr.DataArray, wanted: dict[str, Any]) -> np.ndarray | BaseException:
    """One variable through xarray's CF decoding; a failure is returned, as the direct reads do."""
    try:
        return data.isel({d: v for d, v in wanted.items() if d in data.dims}).values
    except Exception as err:  # noqa: BLE001 - named by the caller with its variable
        return err


async def _gather(reads: list[Any]) -> list[Any]:
    """Run the reads concurrently on Zarr's event loop; failures are returned in place."""
    return await asyncio.gather(*reads, return_exceptions=True)


def _to_series(values: np.ndarray, dims: Sequence[str], inverse: np.ndarray, window: Window, ydim: str) -> np.ndarray:
    """Values over `dims` (some of secondary, y, x) → float32 (T, h, w), repeating and broadcasting."""
    leading = [d for d in (schema.SECONDARY_DIM, ydim) if d in dims]
    order = [dims.index(d) for d in leading] + [i for i, d in enumerate(dims) if d not in leading]
    values = np.asarray(values.transpose(order), dtype=np.float32)
    values = values[inverse] if schema.SECONDARY_DIM in dims else values[None]
    if ydim not in dims:
        values = values[..., None, None]
    return np.broadcast_to(values, (len(inverse), window.height, window.width))


def _direct_arrays(store: Any, dataset: xr.Dataset) -> dict[str, Any]:
    """Zarr arrays of the variables whose stored values are what xarray would decode: no
    scale/offset, the same dtype, and no fill value other than NaN (xarray turns one into NaN)."""
    try:
        group = zarr.open_group(store, mode="r")
    except Exception:  # noqa: BLE001 - a layout xarray understands but zarr cannot open directly: use xarray
        return {}
    arrays = {}
    for name, variable in dataset.data_vars.items():
        encoding = variable.encoding
        if {"scale_factor", "add_offset"} & set(encoding) or encoding.get("dtype", variable.dtype) != variable.dtype:
            continue
        fills = [encoding[k] for k in ("_FillValue", "missing_value") if encoding.get(k) is not None]
        if any(not (np.asarray(f).dtype.kind == "f" and np.isnan(f)) for f in np.ravel(fills)):
            continue
        array = group.get(name)
        if isinstance(array, zarr.Array) and tuple(array.shape) == variable.shape:
            arrays[name] = array.async_array
    return arrays


class CubeCache:
    """Opens each `{root}/{frame_id}.zarr` once per process, lazily.

    Pickling a cache ships only its root (a Location, with its storage options), so a Ray task or actor that receives one opens its own
    cubes; `get_cache` returns the process-wide instance for a root.
    """

    def __init__(self, root: str | Location, *, store_wrapper: Callable[[Any], Any] | None = None) -> None:
        self.root = local(root)
        self.store_wrapper = store_wrapper
        self.stores: dict[str, Any] = {}
        self._cubes: dict[str, Cube] = {}
        self._opening: dict[str, threading.Lock] = {}  # per frame, held while it opens
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (CubeCache, (self.root, self.store_wrapper))

    def get(self, frame_id: str) -> Cube:
        """The frame's cube, opened on first use; other frames open meanwhile (from a bucket an open is a
        few round trips, and read-ahead threads reading other frames need not wait for it)."""
        with self._lock:
            if frame_id in self._cubes:
                return self._cubes[frame_id]
            opening = self._opening.setdefault(frame_id, threading.Lock())
        with opening:
            if frame_id not in self._cubes:
                cube = self._open(frame_id)
                with self._lock:
                    self._cubes[frame_id] = cube
            return self._cubes[frame_id]

    def _open(self, frame_id: str) -> Cube:
        location = self.root.join(f"{frame_id}{schema.CUBE_SUFFIX}")
        try:
            base = location.zarr_store(read_only=True)
            if location.protocol == "s3":  # reads through object_reads: counted, retried, cached, many at once
                from thalia_ray.data.chunk_store import RemoteChunks

                base = RemoteChunks.over(location, base)
            strict = StrictChunks(base)
            store: Any = strict
            if self.store_wrapper is not None:
                store = self.store_wrapper(store)
            self.stores[frame_id] = store
            with warnings.catch_warnings():
                # Consolidated metadata only saves requests at open time; cubes without it are fine.
                warnings.filterwarnings("ignore", "Failed to open Zarr store with consolidated", RuntimeWarning)
                dataset = xr.open_zarr(store, chunks=None, consolidated=None)
        except FileNotFoundError as err:
            raise DataError(f"cube {location}: not found (frame {frame_id})") from err
        except Exception as err:  # noqa: BLE001 - any open failure is reported with the cube named
            raise DataError(f"cube {location}: cannot open ({type(err).__name__}: {err})") from err
        strict.fill_ok = frozenset(str(name) for name, variable in dataset.variables.items()
                                   if variable.attrs.get(UNWRITTEN_CHUNKS) == "fill_value")
        return Cube(frame_id, location.url, dataset, _direct_arrays(store, dataset))

    def missing_variables(self, frame_id: str, variables: Sequence[str]) -> list[str]:
        """Those of `variables` the frame's cube lacks: not declared, or declared only by consolidated
        metadata while the array's own metadata is gone (its folder deleted or never uploaded). Either
        would otherwise surface only once samples are read, one failed read per sample."""
        declared = [v for v in variables if v in self.get(frame_id).dataset]
        stored = sync(_gather([_array_stored(self.stores[frame_id], v) for v in declared]))
        for result in stored:
            if isinstance(result, BaseException):
                raise result
        present = {v for v, here in zip(declared, stored) if here}
        return [v for v in variables if v not in present]


async def _array_stored(store: Any, variable: str) -> bool:
    """Whether the store holds `variable`'s array metadata (v3 first, then v2)."""
    for name in _ARRAY_METADATA:
        if await store.exists(f"{variable}/{name}"):
            return True
    return False


_CACHES: dict[Location, CubeCache] = {}
_CACHES_LOCK = threading.Lock()


def get_cache(root: str | Location) -> CubeCache:
    """The process-wide cache for a dataset root (one per root and storage options)."""
    key = local(root)
    with _CACHES_LOCK:
        if key not in _CACHES:
            _CACHES[key] = CubeCache(key)
        return _CACHES[key]


# ------------------------------------------------------------------------------------ crops
def polygon_area(polygon: Sequence[float]) -> float:
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def target_polygons(sample: Sample, annotations: Mapping[int, Annotation], mask_target: str = "union") -> list[tuple[float, ...]]:
    """Polygons of the members whose masks form the target (`last`, `peak` or every member)."""
    members = [annotations[uid].polygons for uid in sample.unique_ids]
    if mask_target == "last":
        members = members[-1:]
    elif mask_target == "peak":
        members = [max(members, key=lambda polys: sum(polygon_area(p) for p in polys))]
    return [p for polys in members for p in polys]


def mask_bbox(polygons: Sequence[Sequence[float]], frame_shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Inclusive pixel bounding box (row0, col0, row1, col1) of the polygons, clipped to the frame."""
    if not polygons:
        return None
    xs = np.concatenate([np.asarray(p[0::2]) for p in polygons])
    ys = np.concatenate([np.asarray(p[1::2]) for p in polygons])
    height, width = frame_shape
    row0, row1 = int(np.clip(np.floor(ys.min()), 0, height - 1)), int(np.clip(np.ceil(ys.max()), 0, height - 1))
    col0, col1 = int(np.clip(np.floor(xs.min()), 0, width - 1)), int(np.clip(np.ceil(xs.max()), 0, width - 1))
    return row0, col0, row1, col1


def _start(center: int, crop: int, size: int) -> int:
    return int(np.clip(center - crop // 2, 0, size - crop))


def _check_fits(crop: int, frame_shape: tuple[int, int], frame_id: str) -> None:
    height, width = frame_shape
    if crop > height or crop > width:
        raise ValueError(f"crop {crop} is larger than frame {frame_id} ({height}x{width})")


def crop_window(
    sample: Sample,
    annotations: Mapping[int, Annotation],
    frame_shape: tuple[int, int],
    crop: int,
    rng: np.random.Generator | None = None,
    mask_target: str = "union",
    max_retries: int = 10,
) -> Window:
    """The `centred` policy: a square crop around the target polygons' bounding box, shifted by up to
    ±crop/4 per axis and clamped into the frame, retried until the whole box is inside (else centred).
    Without a mask (a negative): the frame centre, shifted the same way in training, as the reference
    crops negatives. Evaluation crops negatives there too, so training sees them where they are tested,
    near the volcanoes a frame is centred on. (Training crops anywhere in the frame taught models that a
    cone in the middle of a crop meant deformation, and the demo's test AUROC fell below chance; see
    BENCHMARKS.md, learnability.) `rng=None` gives the deterministic evaluation crop (centred)."""
    height, width = frame_shape
    _check_fits(crop, frame_shape, sample.frame_id)
    box = mask_bbox(target_polygons(sample, annotations, mask_target), frame_shape)
    if box is None:
        row, col = (height - crop) // 2, (width - crop) // 2
        if rng is None:
            return Window(row, col, crop, crop)
        dr, dc = rng.integers(-(crop // 4), crop // 4 + 1, size=2)
        return Window(int(np.clip(row + dr, 0, height - crop)), int(np.clip(col + dc, 0, width - crop)), crop, crop)
    row0, col0, row1, col1 = box
    center_r, center_c = (row0 + row1) // 2, (col0 + col1) // 2
    centred = Window(_start(center_r, crop, height), _start(center_c, crop, width), crop, crop)
    if rng is None:
        return centred
    for _ in range(max_retries):
        dr, dc = rng.integers(-(crop // 4), crop // 4 + 1, size=2)
        r, c = _start(center_r + int(dr), crop, height), _start(center_c + int(dc), crop, width)
        if r <= row0 and row1 < r + crop and c <= col0 and col1 < c + crop:
            return Window(r, c, crop, crop)
    return centred


def crop_rng(policy: str, seed: int, key: str, epoch: int | None = None) -> np.random.Generator | None:
    """The generator of a sample's crop. `reference`: one per sample key whatever the split, epoch or
    reader, so a sample keeps its crop every epoch (as the reference's shards freeze it) and the cube
    path and an export cut the same window. `centred`: a fresh one per training `epoch`; None (the
    centred evaluation crop) without an epoch."""
    if policy == "reference":
        return group_rng(seed, "crop", key)
    return None if epoch is None else sample_rng(seed, epoch, key)


def reference_window(target: np.ndarray, crop: int, rng: np.random.Generator, frame_id: str = "",
                     max_retries: int = 10) -> Window:
    """The `reference` policy on the (H, W) target mask of the whole frame: the crop centred on the
    mask's bounding box (no mask: on the frame centre) shifted by up to ±crop/4 per axis and clamped
    into the frame, redrawn up to `max_retries` times until it holds a mask pixel. Each draw starts
    from the box centre (the reference lets retries drift from the previous draw). When every draw
    misses (a sparse mask whose box centre is empty), the crop is centred on the mask pixel nearest
    the box centre, so a positive always shows some of its mask."""
    height, width = target.shape
    _check_fits(crop, (height, width), frame_id)
    pixels = np.argwhere(target)
    box = (pixels.min(axis=0), pixels.max(axis=0)) if len(pixels) else (np.zeros(2, int), np.array([height - 1, width - 1]))
    centre = (box[0] + box[1]) // 2  # no mask: the whole frame's box, so the frame centre
    for _ in range(max_retries if len(pixels) else 1):
        dr, dc = rng.integers(-(crop // 4), crop // 4 + 1, size=2)
        window = Window(_start(int(centre[0] + dr), crop, height), _start(int(centre[1] + dc), crop, width), crop, crop)
        if not len(pixels) or target[window.row:window.row + crop, window.col:window.col + crop].any():
            return window
    nearest = pixels[int(np.argmin(((pixels - centre) ** 2).sum(axis=1)))]
    return Window(_start(int(nearest[0]), crop, height), _start(int(nearest[1]), crop, width), crop, crop)


def frame_target_mask(sample: Sample, cube: Cube, rule: str) -> np.ndarray:
    """The sample's binary target mask (`data.mask_target`; `all` as the union) over the whole frame,
    read from the cube's mask plane alone: what the reference crops around."""
    [mask] = _read_checked(cube, sample, [schema.MASK_VAR], Window(0, 0, *cube.shape))
    return mask_target(mask.astype(np.uint8), "union" if rule == "all" else rule).astype(bool)


def sample_window(sample: Sample, annotations: Mapping[int, Annotation], cube: Cube, data_cfg: DataConfig,
                  rng: np.random.Generator | None) -> Window:
    """The crop of a sample under `data.crop_policy`; `rng` comes from `crop_rng`."""
    if data_cfg.crop_policy == "centred":
        return crop_window(sample, annotations, cube.shape, data_cfg.crop, rng, data_cfg.mask_target)
    if rng is None:
        raise ValueError(f"sample {sample.key}: the reference crop policy needs the sample's crop generator (crop_rng)")
    return reference_window(frame_target_mask(sample, cube, data_cfg.mask_target), data_cfg.crop, rng, sample.frame_id)


# ------------------------------------------------------------------------------------ reads
def sample_meta(sample: Sample, annotations: Mapping[int, Annotation], window: Window) -> dict[str, Any]:
    """JSON-serialisable description of a sample, with the per-member annotation fields."""
    members = [annotations[uid] for uid in sample.unique_ids]
    return {
        "frame_id": sample.frame_id,
        "primary_date": sample.primary_date,
        "secondary_dates": list(sample.secondary_dates),
        "unique_ids": list(sample.unique_ids),
        "member_positive": list(sample.member_positive),
        "label": sample.label,
        "split": sample.split,
        "activity_types": [list(a.activity_types) for a in members],
        "intensity_levels": [list(a.intensity_levels) for a in members],
        "phase": members[-1].phase,
        "confidence": float(np.mean([a.confidence for a in members])),
        "flags": [dict(a.flags) for a in members],
        "captions": [a.caption for a in members],
        "window": list(window),
    }


def _checked(cube: Cube, sample: Sample, variable: str, window: Window,
             values: np.ndarray | BaseException) -> np.ndarray:
    """The values read, or a DataError naming cube, variable, dates and window (failure or NaN)."""
    where = (f"cube {cube.url}: variable {variable!r}, dates {sample.primary_date}/"
             f"{list(sample.secondary_dates)}, window {window.describe()}")
    if isinstance(values, BaseException):
        raise DataError(f"{where}: read failed ({type(values).__name__}: {values})") from values
    if np.isnan(values).any():
        raise DataError(f"{where}: {int(np.isnan(values).sum())} NaN values (missing chunk or no data)")
    return values


def _read_checked(cube: Cube, sample: Sample, variables: Sequence[str], window: Window) -> list[np.ndarray]:
    """`window` of the sample's pairs for `variables`; any failure is a DataError naming the read."""
    primary, secondaries = cube.positions(sample.primary_date, sample.secondary_dates)
    try:
        results = cube.read_many(variables, primary, secondaries, window)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - storage and codec errors become DataErrors
        results = [err] * len(variables)
    return [_checked(cube, sample, v, window, r) for v, r in zip(variables, results)]


def read_window(cube: Cube, series: Any, variables: Sequence[str], window: Window) -> list[np.ndarray]:
    """`window` of `variables` for any series of the cube's pairs (an index Sample, a pretraining
    PairSeries: anything with `primary_date` and `secondary_dates`), each float32 (T, h, w); a failed
    read or a NaN value is a DataError naming the cube, variable, dates and window."""
    return _read_checked(cube, series, variables, window)


def read_raw(sample: Sample, cache: CubeCache, window: Window, channels: Sequence[str],
             annotations: Mapping[int, Annotation]) -> RawSample:
    """Read only `window` of the sample's pairs for `channels` and the mask."""
    arrays = _read_checked(cache.get(sample.frame_id), sample, [*channels, schema.MASK_VAR], window)
    image = np.stack(arrays[:-1], axis=1).astype(np.float32, copy=False)
    mask = arrays[-1].astype(np.uint8)
    return RawSample(image=image, mask=mask, key=sample.key, meta=sample_meta(sample, annotations, window))


def read_sample(sample: Sample, annotations: Mapping[int, Annotation], cache: CubeCache, data_cfg: DataConfig,
                rng: np.random.Generator | None = None, channels: Sequence[str] | None = None) -> RawSample:
    """The one way a sample is cut from its cube, for training, evaluation and export alike: the
    crop (`data.crop_policy`, drawn from `rng`, see `crop_rng`; centred policy without one: the
    deterministic evaluation crop), the windowed read of `channels` (default: the configured ones)
    and the mask, and the sample's meta."""
    cube = cache.get(sample.frame_id)
    window = sample_window(sample, annotations, cube, data_cfg, rng)
    return read_raw(sample, cache, window, data_cfg.channels if channels is None else list(channels), annotations)
