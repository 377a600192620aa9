"""Where a configuration's data lives, resolved once with its storage settings.

The storage settings (`S3Options.of(cfg.storage)`: endpoint, region, timeouts) belong to the locations they describe: resolving every
data location here, once, and handing the resulting Locations (which carry their S3 options) to
the index, statistics, cube and shard code means no reader can forget the settings and fall back
to the environment.
"""
from __future__ import annotations

from dataclasses import dataclass

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import DataError
from thalia_ray.errors import ThaliaError
from thalia_ray.storage import Location, S3Options, StorageError, resolve


@dataclass(frozen=True)
class DataLocations:
    root: Location  # cubes and metadata
    statistics: Location  # `data.statistics`, else `{root}/statistics.json`
    shards: Location | None  # `data.shards`, when set

    @classmethod
    def of(cls, data_cfg: DataConfig, settings: S3Options) -> "DataLocations":
        root = resolve(data_cfg.root, settings)
        statistics = resolve(data_cfg.statistics, settings) if data_cfg.statistics else \
            root.join(schema.STATISTICS_FILE)
        shards = resolve(data_cfg.shards, settings) if data_cfg.shards else None
        return cls(root, statistics, shards)


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
