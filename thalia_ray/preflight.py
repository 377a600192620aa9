"""Checks that run before any Ray work: a user's mistake is answered in one line, in seconds.

Starting Ray, then a trainer, takes tens of seconds; a missing dataset, an export that was never
made or a crop larger than the frames would otherwise surface only then, inside a Ray traceback (or
not at all: an export with an impossible crop wrote empty tars). Each check here reads only
metadata: the annotation and time-series files, cube headers, the shard manifest, one probe object
in the store. Every failure is a `ThaliaError` naming the field and the location.
"""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Collection, Sequence

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data.annotations import AnnotationError
from thalia_ray.data.cube import CubeCache, DataError
from thalia_ray.data.index import SampleIndex, epoch_draw
from thalia_ray.errors import ThaliaError
from thalia_ray.storage import Location, StorageError, resolve
from thalia_ray.store.records import StoreError

SPLITS = ("train", "val", "test")
_CUBE_THREADS = 8  # cube headers are small reads; S3 latency dominates, so read several at once


def location_present(url: str, field: str, storage_cfg: Any = None,
                     missing: type[ThaliaError] = DataError, hint: str = "") -> Location:
    """`url` resolved; a missing bucket or folder is named as such, with the config field it came from."""
    loc = resolve(url, storage_cfg)
    if loc.protocol == "s3":
        bucket = loc.path.split("/", 1)[0]
        if not resolve(f"s3://{bucket}", storage_cfg).exists():
            where = f" at {loc.s3.endpoint_url}" if loc.s3.endpoint_url else ""
            raise StorageError(f"{field} {url}: the bucket {bucket!r} does not exist{where}")
    if not loc.exists():
        raise missing(f"{field} {url}: no such folder or object{hint}")
    return loc


def writable(url: str, field: str, storage_cfg: Any = None) -> Location:
    """`url` resolved, after writing and removing one probe object there (creating the folder)."""
    loc = resolve(url, storage_cfg)
    if loc.protocol == "file" and loc.exists() and not loc.is_dir():
        raise StoreError(f"{field} {url}: is a file, not a folder")
    probe = loc.join(f".thalia-preflight-{uuid.uuid4().hex[:12]}")
    try:
        probe.write_bytes(b"")
        probe.remove()
    except OSError as err:
        raise StoreError(f"{field} {url}: not writable ({err.strerror or err})") from None
    except StorageError as err:
        raise StorageError(f"{field} {url}: not writable: {err}") from None
    return loc


def sample_index(cfg: ThaliaConfig) -> SampleIndex:
    """The dataset's index, after checking that `data.root` exists (its metadata are read here)."""
    root = location_present(cfg.data.root, "data.root", cfg.storage)
    try:
        return SampleIndex.from_config(cfg.data, cfg.seed, location=root)
    except AnnotationError as err:
        raise AnnotationError(f"data.root: {err}") from None


def cube_shapes(cfg: ThaliaConfig, frame_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(height, width) of each frame's cube, read from the cube headers (a missing cube is a DataError)."""
    cache = CubeCache(resolve(cfg.data.root, cfg.storage))
    with ThreadPoolExecutor(min(_CUBE_THREADS, max(len(frame_ids), 1))) as pool:
        shapes = list(pool.map(lambda frame: cache.get(frame).shape, frame_ids))
    return dict(zip(frame_ids, shapes))


def crop_fits(crop: int, shapes: dict[str, tuple[int, int]]) -> None:
    small = {frame: shape for frame, shape in shapes.items() if crop > min(shape)}
    if small:
        listed = ", ".join(f"{frame} ({h}x{w})" for frame, (h, w) in sorted(small.items()))
        raise ConfigError(f"data.crop {crop} is larger than {len(small)} frame(s): {listed}")


def cube_pools(cfg: ThaliaConfig, splits: Sequence[str]) -> dict[str, list[Any]]:
    """Each split's samples from the cubes, after checking the cubes they need open and fit the crop."""
    index = sample_index(cfg)
    pools = {split: index.samples(split) for split in splits}
    frames = sorted({sample.frame_id for pool in pools.values() for sample in pool})
    crop_fits(cfg.data.crop, cube_shapes(cfg, frames))
    return pools


def shard_pools(cfg: ThaliaConfig, splits: Sequence[str]) -> dict[str, list[Any]] | None:
    """Each split's shard entries, checked against the config (channels, label rule, splits, T).

    Published shards are only listed (their labels live inside the tars, which a Ray task reads):
    None then, and the epoch sizes are not known here.
    """
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.shards.published import FOLDERS, published_shards
    from thalia_ray.data.shards.tar import ShardError
    from thalia_ray.data.sources import OwnShards

    location_present(str(cfg.data.shards), "data.shards", cfg.storage, ShardError,
                     "; export the dataset first (`thalia-ray export --out ...`)")
    shards = DataLocations.of(cfg.data, cfg.storage).shards
    assert shards is not None  # the config requires data.shards with source: shards
    if cfg.data.shard_format == "published":
        for split in splits:
            for folder in FOLDERS.get(split, (split,)):
                published_shards(shards, cfg.data.length, folder)
        return None
    source = OwnShards.open(cfg.data, shards, cfg.seed, splits)
    return {split: source.entries[split] for split in splits}


def non_empty(cfg: ThaliaConfig, pools: dict[str, list[Any]]) -> None:
    empty = [split for split, pool in pools.items() if not pool]
    if empty:
        where = cfg.data.shards if cfg.data.source == "shards" else cfg.data.root
        raise DataError(f"{where}: split(s) {empty} have no samples for data.length={cfg.data.length}"
                        f"{f' and data.frames={cfg.data.frames}' if cfg.data.frames else ''}")


def for_training(cfg: ThaliaConfig, run_id: str | None = None, varied: Collection[str] = ()) -> None:
    """Everything `train` needs, checked without Ray. A sweep passes the dotted paths its search space
    `varied`: checks that depend on them are left to the trials (a base value may be one no trial uses)."""
    from thalia_ray.store.layout import check_id

    if run_id is not None:
        check_id(run_id)
    if any(path.startswith("data.") or path == "seed" for path in varied):
        location_present(cfg.data.root if cfg.data.source == "cube" else str(cfg.data.shards),
                         "data.root" if cfg.data.source == "cube" else "data.shards", cfg.storage)
    else:
        pools = cube_pools(cfg, SPLITS) if cfg.data.source == "cube" else shard_pools(cfg, SPLITS)
        if pools is not None:
            non_empty(cfg, pools)
        if pools is not None and not any(path.startswith("train.") for path in varied):
            from thalia_ray.train.trainer import steps_per_epoch  # imports torch and Ray Train: only when needed

            sizes = {split: len(epoch_draw(pool, split, 0, cfg.seed, cfg.data.balance)) for split, pool in pools.items()}
            steps_per_epoch(cfg, sizes)
    writable(cfg.storage.store, "storage.store", cfg.storage)


def for_export(cfg: ThaliaConfig, out: str, splits: Sequence[str]) -> None:
    """`export` reads the cubes of `splits` and writes under `out`."""
    unknown = [split for split in splits if split not in cfg.data.splits]
    if unknown:
        raise ConfigError(f"--split {unknown}: not a configured split; data.splits has {list(cfg.data.splits)}")
    non_empty(cfg, cube_pools(cfg, splits))
    writable(out, "--out", cfg.storage)


def for_stats(cfg: ThaliaConfig, split: str) -> None:
    """`prepare stats` reads whole frames of one split (no crop), so only the index is checked."""
    if split not in cfg.data.splits:
        raise ConfigError(f"--split {split!r}: not a configured split; data.splits has {list(cfg.data.splits)}")
    non_empty(cfg, {split: sample_index(cfg).samples(split)})


def for_evaluation(cfg: ThaliaConfig, split: str) -> None:
    """`evaluate` re-reads one split of the run's data source."""
    if cfg.data.source == "cube":
        non_empty(cfg, cube_pools(cfg, (split,)))
        return
    pools = shard_pools(cfg, (split,))
    if pools is not None:
        non_empty(cfg, pools)
