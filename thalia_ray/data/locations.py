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
from thalia_ray.storage import Location, S3Options, resolve


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
