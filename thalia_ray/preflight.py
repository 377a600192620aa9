"""Checks that run before any Ray work: a user's mistake is answered in one line, in seconds.

Starting Ray, then a trainer, takes tens of seconds; a missing dataset, an export that was never
made or a crop larger than the frames would otherwise surface only then, inside a Ray traceback (or
not at all: an export with an impossible crop wrote empty tars). Each check here reads only
metadata: the annotation and time-series files, cube headers, the shard manifest, one probe object
in the store. Every failure is a `ThaliaError` naming the field and the location.
"""
from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Collection, Sequence

from zarr.core.sync import sync

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationError
from thalia_ray.data.cube import CubeCache, DataError
from thalia_ray.data.index import SampleIndex, epoch_draw
from thalia_ray.data.samples import Sample
from thalia_ray.errors import ThaliaError, excerpt
from thalia_ray.storage import Location, S3Options, StorageError, resolve
from thalia_ray.store.records import STATUS, StoreError

SPLITS = ("train", "val", "test")
_CUBE_THREADS = 8  # cube headers are small reads; S3 latency dominates, so read several at once


def location_present(url: str, field: str, settings: S3Options,
                     missing: type[ThaliaError] = DataError, hint: str = "") -> Location:
    """`url` resolved; a missing bucket or folder is named as such, with the config field it came from.

    The location itself is looked up first: s3fs answers a lookup of a bare bucket with False for any
    failure, so an unreachable endpoint or refused credentials would read as a missing bucket."""
    loc = resolve(url, settings)
    if loc.exists():
        return loc
    if loc.protocol == "s3":
        bucket = loc.path.split("/", 1)[0]
        if not resolve(f"s3://{bucket}", settings).exists():
            where = f" at {loc.s3.endpoint_url}" if loc.s3.endpoint_url else ""
            raise StorageError(f"{field} {url}: the bucket {bucket!r} does not exist{where}")
    raise missing(f"{field} {url}: no such folder or object{hint}")


def writable(url: str, field: str, settings: S3Options) -> Location:
    """`url` resolved, after writing and removing one probe object there (creating the folder)."""
    loc = resolve(url, settings)
    if loc.protocol == "file" and loc.exists() and not loc.is_dir():
        raise StoreError(f"{field} {url}: is a file, not a folder")
    probe = loc.join(f".thalia-preflight-{uuid.uuid4().hex[:12]}")
    try:
        probe.write_bytes(b"")
        probe.remove()
    except (OSError, StorageError) as err:
        local = err if isinstance(err, OSError) else err.__cause__  # a local write's OS error, if that is it
        if loc.protocol == "file" and isinstance(local, OSError):
            raise StoreError(f"{field} {url}: not writable ({local.strerror or local})") from None
        raise StorageError(f"{field} {url}: not writable: {err}") from None
    return loc


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


def statistics_usable(cfg: ThaliaConfig) -> None:
    """The normalisation statistics (`data.normalize`), read as the readers will: a missing or malformed
    file, or one without a configured channel, would otherwise fail every sample after Ray starts."""
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.transforms import load_statistics  # SciPy: only when needed

    if not cfg.data.normalize:
        return
    location = DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics
    field = "data.statistics" + ("" if cfg.data.statistics else f" (default data.root/{schema.STATISTICS_FILE})")
    location_present(location.url, field, S3Options.of(cfg.storage),
                     hint="; compute them with `thalia-ray prepare stats --out ...`, or set data.normalize=false")
    try:
        stats = load_statistics(location)
    except ValueError as err:
        raise DataError(f"{field}: {err}") from None
    missing = sorted({schema.statistics_key(channel) for channel in cfg.data.channels} - set(stats))
    if missing:
        raise DataError(f"{field} {location.url}: no entry for {missing}, read for data.geomorphology / "
                        "data.atmospheric")


def pretrained_present(cfg: ThaliaConfig) -> None:
    """`model.pretrained`'s stored run (with a best checkpoint) or local file; the trainer would look for
    them only after Ray starts. ImageNet weights are left to the trainer (timm's and smp's caches)."""
    from thalia_ray.models.pretrained import IMAGENET, PretrainedWeightsError, run_reference, weights_file

    pretrained = cfg.model.pretrained
    run_id = run_reference(pretrained)
    if run_id is not None:
        from thalia_ray.store import ExperimentStore

        try:
            checkpoint_loads(ExperimentStore.of(cfg.storage), run_id)
        except StoreError as err:
            raise PretrainedWeightsError(f"model.pretrained {pretrained!r}: {err}") from None
    elif pretrained is not None and pretrained != IMAGENET:
        weights_file(pretrained)


def shard_pools(cfg: ThaliaConfig, splits: Sequence[str]) -> dict[str, list[Any]] | None:
    """Each split's shard entries, checked against the config (channels, label rule, splits, T).

    Published shards are only listed (their labels live inside the tars, which a Ray task reads):
    None then, and the epoch sizes are not known here.
    """
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.shards.published import FOLDERS, published_shards
    from thalia_ray.data.shards.tar import ShardError
    from thalia_ray.data.sources import OwnShards

    location_present(str(cfg.data.shards), "data.shards", S3Options.of(cfg.storage), ShardError,
                     "; export the dataset first (`thalia-ray export --out ...`)")
    shards = DataLocations.of(cfg.data, S3Options.of(cfg.storage)).shards
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
    if run_id is not None:
        resumable(cfg, run_id)
    if any(path.startswith("data.") or path == "seed" for path in varied):
        location_present(cfg.data.root if cfg.data.source == "cube" else str(cfg.data.shards),
                         "data.root" if cfg.data.source == "cube" else "data.shards", S3Options.of(cfg.storage))
    else:
        pools = cube_pools(cfg, SPLITS) if cfg.data.source == "cube" else shard_pools(cfg, SPLITS)
        if pools is not None:
            non_empty(cfg, pools)
        statistics_usable(cfg)
        if pools is not None and not any(path.startswith("train.") for path in varied):
            from thalia_ray.train.trainer import steps_per_epoch  # imports torch and Ray Train: only when needed

            sizes = {split: len(epoch_draw(pool, split, 0, cfg.seed, cfg.data.epoch_plan, cfg.data.label_fraction))
                     for split, pool in pools.items()}
            steps_per_epoch(cfg, sizes)
    if "model.pretrained" not in varied:
        pretrained_present(cfg)
    writable(cfg.storage.store, "storage.store", S3Options.of(cfg.storage))


def resumable(cfg: ThaliaConfig, run_id: str) -> None:
    """`--run-id`: a valid id of a run that is new or can go on; a finished run is refused here, not after
    Ray has started."""
    from thalia_ray.store.layout import ExperimentStore, check_id

    from thalia_ray.train.trainer import check_ray_snapshot  # imports torch and Ray Train: only with --run-id

    check_id(run_id)
    store = ExperimentStore.of(cfg.storage)
    record = store.run(run_id)
    if record.loc.join(STATUS).exists() and record.read_status().get("status") == "finished":
        raise StoreError(f"run {run_id} is already finished (its records are in {record.loc}): give a new --run-id, "
                         "or none for a generated one")
    check_ray_snapshot(store, run_id)


def checkpoint_loads(store: Any, run_id: str) -> None:
    """A finished run's best checkpoint, which `evaluate` loads in a Ray task, is refused here when it is
    damaged or hostile (`checkpoint.check_state`)."""
    from thalia_ray.train.checkpoint import check_state
    from thalia_ray.train.evaluate import best_checkpoint

    check_state(best_checkpoint(store, run_id))


def for_sweep(cfg: ThaliaConfig, sweep_id: str | None) -> None:
    """`sweep`: a valid `--sweep-id` (room left for its trials' run ids), then what `train` needs, leaving the
    checks that depend on the search space's dotted paths to the trials."""
    from thalia_ray.store.layout import check_id

    assert cfg.sweep is not None  # the CLI refuses a file without a sweep section first
    if sweep_id is not None:
        check_id(sweep_id, "sweep id")
    for_training(cfg, varied=tuple(cfg.sweep.space))


def for_export(cfg: ThaliaConfig, out: str, splits: Sequence[str], samples_per_shard: int = 64,
               all_channels: bool = False) -> None:
    """`export` reads the cubes of `splits` (the configured channels, or all nine with `all_channels`)
    and writes shards of `samples_per_shard` under `out`."""
    unknown = [split for split in splits if split not in cfg.data.splits]
    if unknown:
        raise ConfigError(f"--split {unknown}: not a configured split; data.splits has {list(cfg.data.splits)}")
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard {samples_per_shard}: a shard holds at least 1 sample")
    non_empty(cfg, cube_pools(cfg, splits, schema.ALL_CHANNELS if all_channels else None))
    writable(out, "--out", S3Options.of(cfg.storage))


def for_stats(cfg: ThaliaConfig, split: str) -> None:
    """`prepare stats` reads whole frames of one split (no crop), so only the index is checked."""
    if split not in cfg.data.splits:
        raise ConfigError(f"--split {excerpt(split)}: not a configured split; data.splits has {list(cfg.data.splits)}")
    non_empty(cfg, {split: sample_index(cfg).samples(split)})


def for_evaluation(cfg: ThaliaConfig, split: str) -> None:
    """`evaluate` re-reads one split of the run's data source, normalised as in training."""
    pools = cube_pools(cfg, (split,)) if cfg.data.source == "cube" else shard_pools(cfg, (split,))
    if pools is not None:
        non_empty(cfg, pools)
    statistics_usable(cfg)
