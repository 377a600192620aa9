"""Where a configuration's data lives, resolved once with its storage settings.

`storage.endpoint_url`/`storage.region` belong to the locations they describe: resolving every
data location here, once, and handing the resulting Locations (which carry their S3 options) to
the index, statistics, cube and shard code means no reader can forget the settings and fall back
to the environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.storage import Location, resolve


@dataclass(frozen=True)
class DataLocations:
    root: Location  # cubes and metadata
    statistics: Location  # `data.statistics`, else `{root}/statistics.json`
    shards: Location | None  # `data.shards`, when set

    @classmethod
    def of(cls, data_cfg: DataConfig, storage_cfg: Any | None = None) -> "DataLocations":
        root = resolve(data_cfg.root, storage_cfg)
        statistics = resolve(data_cfg.statistics, storage_cfg) if data_cfg.statistics else \
            root.join(schema.STATISTICS_FILE)
        shards = resolve(data_cfg.shards, storage_cfg) if data_cfg.shards else None
        return cls(root, statistics, shards)
