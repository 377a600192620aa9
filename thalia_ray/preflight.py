"""Checks that run before any Ray work: a user's mistake is answered in one line, in seconds.

Starting Ray, then a trainer, takes tens of seconds; a missing dataset, an export that was never
made or a crop larger than the frames would otherwise surface only then, inside a Ray traceback (or
not at all: an export with an impossible crop wrote empty tars). Each check here reads only
metadata: the annotation and time-series files, cube headers, the shard manifest, one probe object
in the store. Every failure is a `ThaliaError` naming the field and the location. What a data source
needs is its class's `preflight` (`data.sources`); the cube checks are in `data.cube_checks`.
"""
from __future__ import annotations

import uuid
from typing import Any, Collection, Sequence

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import DataError
from thalia_ray.data.cube_checks import cube_pools, sample_index
from thalia_ray.data.index import epoch_draw
from thalia_ray.data.locations import DataLocations, location_present
from thalia_ray.data.sources import source_class
from thalia_ray.errors import excerpt
from thalia_ray.storage import Location, S3Options, StorageError, resolve
from thalia_ray.store.records import STATUS, StoreError

SPLITS = ("train", "val", "test")


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


def statistics_usable(cfg: ThaliaConfig) -> None:
    """The normalisation statistics (`data.normalize`), read as the readers will: a missing or malformed
    file, or one without a configured channel, would otherwise fail every sample after Ray starts."""
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
    from thalia_ray.ids import run_reference
    from thalia_ray.models.pretrained import IMAGENET, PretrainedWeightsError, weights_file

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


def non_empty(cfg: ThaliaConfig, pools: dict[str, list[Any]]) -> None:
    empty = [split for split, pool in pools.items() if not pool]
    if empty:
        where = source_class(cfg.data).configured_root(cfg.data)
        raise DataError(f"{where}: split(s) {empty} have no samples for data.length={cfg.data.length}"
                        f"{f' and data.frames={cfg.data.frames}' if cfg.data.frames else ''}")


def for_training(cfg: ThaliaConfig, run_id: str | None = None, varied: Collection[str] = ()) -> None:
    """Everything `train` needs, checked without Ray. A sweep passes the dotted paths its search space
    `varied`: checks that depend on them are left to the trials (a base value may be one no trial uses)."""
    if run_id is not None:
        resumable(cfg, run_id)
    source = source_class(cfg.data)
    if any(path.startswith("data.") or path == "seed" for path in varied):
        location_present(source.configured_root(cfg.data), source.root_field, S3Options.of(cfg.storage))
    else:
        pools = source.preflight(cfg, DataLocations.of(cfg.data, S3Options.of(cfg.storage)), SPLITS)
        if source.items_known:
            non_empty(cfg, pools)
        statistics_usable(cfg)
        if source.items_known and not any(path.startswith("train.") for path in varied):
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
    from thalia_ray.ids import check_id
    from thalia_ray.store.layout import ExperimentStore

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
    from thalia_ray.ids import check_id

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
    source = source_class(cfg.data)
    pools = source.preflight(cfg, DataLocations.of(cfg.data, S3Options.of(cfg.storage)), (split,))
    if source.items_known:
        non_empty(cfg, pools)
    statistics_usable(cfg)
