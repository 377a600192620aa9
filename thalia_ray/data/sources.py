"""Where a run's samples come from: minicubes, our own shards or the published shards.

`data.source` names one of `SOURCES`, the registry every labelled source class joins by defining `name`.
The class owns what the rest of the service asks of a source, so nothing else dispatches on the name:
`check_config` (settings it cannot read with, before any work), `preflight` (its catalogue and data checked
from metadata before Ray starts) and `from_config` (the reader, with its catalogue). Adding a source is one
new subclass (and its name among `DataConfig.source`'s values).

Each source owns the three steps the pipeline runs for it, so the pipeline needs no knowledge of
formats:

- `epoch_items(split, epoch)`: the items of one epoch (the same balanced, seeded draw for every
  source: every positive plus fresh negatives for train, everything in index order otherwise);
- `read(items, rng)`: fetch the raw data of those items, one row (a dict of columns) per item, or a
  `BadSample` naming what could not be read; runs in Ray read tasks;
- `record(row, split, ...)`: a row of `split` → the model-ready record; runs in the same read task, right
  after `read`. The benchmark's labelled sources (`LabelledSource`: cubes, own and published shards) decode
  a row to a RawSample and finalize it with its targets and labels; pretraining's source
  (`thalia_ray.pretrain.source`) makes records of its own, without labels.

A source is shipped to every read and map task, so `for_items(items)` returns the slim copy that
reading `items` needs (a cube source drops its index and keeps only the items' annotations).
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from thalia_ray.config import ConfigError, DataConfig, ThaliaConfig
from thalia_ray.data.annotations import Annotation, LeftOut
from thalia_ray.data.cube import DataError, get_cache, read_sample
from thalia_ray.data.cube_checks import cube_pools
from thalia_ray.data.index import SampleIndex, epoch_draw
from thalia_ray.data.locations import DataLocations, location_present
from thalia_ray.data.read_ahead import read_ahead, samples_in_flight
from thalia_ray.data.samples import BadSample, RawSample, Sample
from thalia_ray.data.shards.manifest import load_manifest, manifest_entries, shard_root
from thalia_ray.data.shards.npy import decode_own, member_limit
from thalia_ray.data.shards.published import FOLDERS, decode_published, published_shards, scan_published
from thalia_ray.data.shards.tar import Blob, ShardEntry, ShardError, fetch_ranges, parse_members
from thalia_ray.data.transforms import Statistics, finalize
from thalia_ray.errors import StorageProblem
from thalia_ray.storage import Location, S3Options

Row = dict[str, Any]
RngFor = Callable[[str], "np.random.Generator | None"]  # sample key → crop generator (see cube.crop_rng)


class Source(ABC):
    """One kind of sample source; see the module docstring for the contract."""

    name: ClassVar[str]

    @property
    @abstractmethod
    def location(self) -> Location:
        """Where the source reads from (for Ray task options and messages)."""

    @abstractmethod
    def epoch_items(self, split: str, epoch: int) -> list[Any]:
        """One epoch's items of a split, in delivery order."""

    def left_out(self) -> list[LeftOut]:
        """The annotations and series members its catalogue leaves out, and why (none known: [])."""
        return []

    @abstractmethod
    def for_items(self, items: Sequence[Any]) -> "Source":
        """The copy a task reading `items` needs, without the catalogue of the whole source."""

    @abstractmethod
    def read(self, items: Sequence[Any], rng: RngFor) -> Iterator[Row | BadSample]:
        """Raw rows of `items` (each with `key` and `origin`), or a BadSample per unreadable item."""

    @abstractmethod
    def record(self, row: Row, split: str, stats: Statistics | None, rng: np.random.Generator | None,
               training: bool) -> dict[str, Any]:
        """A row of `split` from `read` → the model-ready record (normalised with `stats` when given; `rng`
        draws a training sample's augmentations); raises DataError/ShardError/ValueError for bad data."""

    def extra_bytes(self) -> int:
        """Bytes a record holds beyond the configured image and mask (the pipeline sizes blocks by them)."""
        return 0


SOURCES: dict[str, type["LabelledSource"]] = {}  # data.source → its class; each class joins as it is defined


def source_class(data: DataConfig) -> type["LabelledSource"]:
    """The class `data.source` names, once it has checked the settings (`check_config`)."""
    try:
        cls = SOURCES[data.source]
    except KeyError:
        raise ConfigError(f"data.source {data.source!r}: no such source; the sources: {', '.join(sorted(SOURCES))}") \
            from None
    cls.check_config(data)
    return cls


class LabelledSource(Source):
    """A source of the benchmark's labelled samples: a row decodes to a RawSample, which `finalize` turns
    into a record with its targets, label and auxiliary targets. A subclass with a `name` is registered."""

    data: DataConfig
    root_field: ClassVar[str]  # the setting that says where it reads: "data.root" or "data.shards"
    items_known: ClassVar[bool] = True  # False: an epoch's items are known only once the data are read

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):
            SOURCES[cls.name] = cls

    @classmethod
    def check_config(cls, data: DataConfig) -> None:
        """Refuse settings this source cannot read with: a ConfigError naming the field."""

    @classmethod
    def configured_root(cls, data: DataConfig) -> str:
        """Where it reads, as configured (`root_field`'s value)."""
        return str(getattr(data, cls.root_field.removeprefix("data.")))

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> "LabelledSource":
        """The reader of `locations` (resolved with the storage settings), its catalogue loaded for `splits`."""

    @classmethod
    @abstractmethod
    def preflight(cls, cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> dict[str, list[Any]]:
        """Check, from metadata and before Ray starts, that the data of `splits` can be read as configured;
        each split's items (empty lists when `items_known` is False)."""

    @abstractmethod
    def decode(self, row: Row, split: str) -> RawSample:
        """A row of `split` from `read` → RawSample; raises DataError/ShardError/ValueError for bad data."""

    def record(self, row: Row, split: str, stats: Statistics | None, rng: np.random.Generator | None,
               training: bool) -> dict[str, Any]:
        return finalize(self.decode(row, split), self.data, stats, rng, training)


# ------------------------------------------------------------------------------------ cubes
@dataclass(frozen=True)
class CubeSource(LabelledSource):
    """Windowed reads from `{root}/{frame}.zarr`: random crops for train (`rng`), evaluation crops otherwise."""

    name: ClassVar[str] = "cube"
    root_field: ClassVar[str] = "data.root"
    data: DataConfig
    root: Location
    seed: int
    index: SampleIndex | None = field(default=None, compare=False)  # None in task copies
    annotations: Mapping[int, Annotation] = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> "CubeSource":
        return cls(cfg.data, locations.root, cfg.seed, SampleIndex.from_config(cfg.data, cfg.seed, locations.root))

    @classmethod
    def preflight(cls, cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> dict[str, list[Any]]:
        return dict(cube_pools(cfg, splits))

    @property
    def location(self) -> Location:
        return self.root

    def epoch_items(self, split: str, epoch: int) -> list[Sample]:
        if self.index is None:
            raise RuntimeError("a task copy of a cube source has no index")
        return self.index.epoch(split, epoch, self.seed)

    def left_out(self) -> list[LeftOut]:
        return list(self.index.left_out) if self.index is not None else []

    def for_items(self, items: Sequence[Sample]) -> "CubeSource":
        annotations = self.index.annotations if self.index is not None else self.annotations
        needed = {u: annotations[u] for s in items for u in s.unique_ids}
        return dataclasses.replace(self, index=None, annotations=needed)

    def read(self, items: Sequence[Sample], rng: RngFor) -> Iterator[Row | BadSample]:
        """Rows in the order of `items`; from object storage several samples are read at once (read_ahead)."""
        cache = get_cache(self.root)

        def one(sample: Sample) -> Row | BadSample:
            origin = cache.root.join(f"{sample.frame_id}.zarr").url
            try:
                raw = read_sample(sample, self.annotations, cache, self.data, rng(sample.key))
            except (DataError, OSError, ValueError, StorageProblem) as err:
                return BadSample(origin, sample.key, f"{type(err).__name__}: {err}")
            return {"key": raw.key, "origin": origin, "image": raw.image, "mask": raw.mask, "meta": json.dumps(raw.meta)}

        raw_bytes = 4 * self.data.length * (len(self.data.channels) + 1) * self.data.crop ** 2
        yield from read_ahead(one, items, samples_in_flight(self.root, raw_bytes))

    def decode(self, row: Row, split: str) -> RawSample:
        return RawSample(image=row["image"], mask=row["mask"], key=str(row["key"]), meta=json.loads(row["meta"]))


# ----------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardSource(LabelledSource):
    """Ranged reads of shard members; balanced epochs drawn from the entries' labels."""

    root_field: ClassVar[str] = "data.shards"
    data: DataConfig
    root: Location
    seed: int
    entries: Mapping[str, list[ShardEntry]] = field(default_factory=dict, compare=False)  # per split; {} in task copies

    @classmethod
    def check_config(cls, data: DataConfig) -> None:
        if not data.shards:
            raise ConfigError(f"data.source is {cls.name!r} but data.shards (the shard root) is not set")

    @classmethod
    @abstractmethod
    def open(cls, data: DataConfig, root: Location, seed: int, splits: Sequence[str]) -> "ShardSource":
        """The source of the shards under `root`, their entries listed for `splits`."""

    @classmethod
    def from_config(cls, cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> "ShardSource":
        return cls.open(cfg.data, cls._shards(locations), cfg.seed, splits)

    @classmethod
    def preflight(cls, cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> dict[str, list[Any]]:
        location_present(str(cfg.data.shards), "data.shards", S3Options.of(cfg.storage), ShardError,
                         "; export the dataset first (`thalia-ray export --out ...`)")
        return cls.listed(cfg.data, cls._shards(locations), cfg.seed, splits)

    @classmethod
    def listed(cls, data: DataConfig, root: Location, seed: int, splits: Sequence[str]) -> dict[str, list[Any]]:
        """Each split's entries, checked against the config (`preflight`, once the shard root exists)."""
        source = cls.open(data, root, seed, splits)
        return {split: list(source.entries[split]) for split in splits}

    @staticmethod
    def _shards(locations: DataLocations) -> Location:
        if locations.shards is None:
            raise ConfigError("data.shards (the shard root) is not set")
        return locations.shards

    @property
    def location(self) -> Location:
        return self.root

    def epoch_items(self, split: str, epoch: int) -> list[ShardEntry]:
        return epoch_draw(self.entries[split], split, epoch, self.seed, self.data.epoch_plan, self.data.label_fraction)

    def for_items(self, items: Sequence[ShardEntry]) -> "ShardSource":
        return dataclasses.replace(self, entries={})

    def read(self, items: Sequence[ShardEntry], rng: RngFor) -> Iterator[Row | BadSample]:
        """Rows in the order of `items` (fetches run in shard/offset order)."""
        fetched = dict(fetch_ranges(items))
        for entry in items:
            data = fetched[entry]
            if isinstance(data, Exception):
                yield BadSample(entry.shard.url, entry.key, f"{type(data).__name__}: {data}")
            else:
                yield {"key": entry.key, "origin": entry.shard.url, "offset": entry.offset, "blob": data}

    def decode(self, row: Row, split: str) -> RawSample:
        key = str(row["key"])
        where = f"shard {row['origin']}, key {key}"
        members = parse_members(row["blob"], where).get(key)
        if members is None:
            raise ShardError(f"{where}: the manifest's byte range holds no members of this key")
        raw = self.decode_members(members, key, where, split)
        bad = int(np.size(raw.image) - np.isfinite(raw.image).sum())
        if bad:
            raise ShardError(f"{where}: {bad} non-finite image values")
        return raw

    @abstractmethod
    def decode_members(self, members: dict[str, Blob], key: str, where: str, split: str) -> RawSample:
        """One sample's tar members → RawSample."""


@dataclass(frozen=True)
class OwnShards(ShardSource):
    """Shards written by `export`: `.npy` members, entries and stored channels from the manifest."""

    name: ClassVar[str] = "shards"
    stored_channels: tuple[str, ...] = ()
    compressed: bool = False  # the manifest's `compress`: members are `.npy.gz`
    member_limit: int | None = None  # most bytes a member may inflate to (npy.member_limit)
    left_out_rows: tuple[dict[str, Any], ...] = ()  # what the export's index left out (its manifest records it)

    @classmethod
    def check_config(cls, data: DataConfig) -> None:
        super().check_config(data)
        if data.policy == "resample":
            raise ShardError("data.policy=resample re-draws series every epoch; shards hold the fixed enumerate "
                             "series: use data.source=cube")

    @classmethod
    def open(cls, data: DataConfig, root: Location, seed: int, splits: Sequence[str]) -> "OwnShards":
        """Read the manifest and check it against the config before any Ray work."""
        cls.check_config(data)
        manifest = load_manifest(root, data.length)
        padding = manifest.get("padding", "per_group")  # exports from before the field padded per group
        if data.length > 1 and padding != data.padding:
            raise ShardError(f"shards under {data.shards} were exported with padding={padding!r}, the config asks "
                             f"for data.padding={data.padding!r}: their short series hold other members")
        if manifest["label_rule"] != data.label_rule:
            raise ShardError(f"shards under {data.shards} were exported with label_rule={manifest['label_rule']!r}, "
                             f"the config asks for {data.label_rule!r}")
        absent = [s for s in splits if s not in manifest["splits"]]
        if absent:
            raise ShardError(f"shards under {data.shards} hold splits {manifest['splits']}, not {absent[0]!r}")
        missing = [c for c in data.channels if c not in manifest["channels"]]
        if missing:
            raise ShardError(f"data.geomorphology/data.atmospheric: channels {missing} are not in the shards under "
                             f"{data.shards} (they hold "
                             f"{manifest['channels']}); export again with these channels or with --all-channels")
        base = shard_root(root, data.length)
        entries = {split: manifest_entries(manifest, base, split) for split in splits}
        crop = manifest.get("crop")  # written by every export; absent: bounded by each member's own header
        limit = member_limit(data.length, len(manifest["channels"]), int(crop)) if crop else None
        return cls(data, root, seed, entries, tuple(manifest["channels"]), bool(manifest["compress"]), limit,
                   tuple(manifest.get("left_out", ())))

    def left_out(self) -> list[LeftOut]:
        return [LeftOut(**row) for row in self.left_out_rows]

    def decode_members(self, members: dict[str, Blob], key: str, where: str, split: str) -> RawSample:
        return decode_own(members, key, where, self.data.channels, self.stored_channels, self.compressed,
                          self.member_limit)


@dataclass(frozen=True)
class PublishedShards(ShardSource):
    """The published Thalia shards (`torch.save` members), indexed by scanning their tars."""

    name: ClassVar[str] = "published"
    items_known: ClassVar[bool] = False  # their labels live inside the tars, which Ray tasks read

    @classmethod
    def open(cls, data: DataConfig, root: Location, seed: int, splits: Sequence[str]) -> "PublishedShards":
        entries = {split: scan_published(root, data.length, split, data.label_rule_for(split)) for split in splits}
        return cls(data, root, seed, entries)

    @classmethod
    def listed(cls, data: DataConfig, root: Location, seed: int, splits: Sequence[str]) -> dict[str, list[Any]]:
        """Only the tars are listed (each split's folders must hold some): reading them is a Ray task's work."""
        for split in splits:
            for folder in FOLDERS.get(split, (split,)):
                published_shards(root, data.length, folder)
        return {split: [] for split in splits}

    def decode_members(self, members: dict[str, Blob], key: str, where: str, split: str) -> RawSample:
        return decode_published(members, key, where, self.data, split)


def open_source(cfg: ThaliaConfig, locations: DataLocations, splits: Sequence[str]) -> Source:
    """The source `cfg.data.source` names, reading from `locations` (resolved with the storage settings),
    with its catalogue (index, manifest or scan) loaded for `splits`."""
    return source_class(cfg.data).from_config(cfg, locations, splits)
