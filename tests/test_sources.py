"""The source registry (`thalia_ray.data.sources`): `data.source` names a class, and that class alone checks
the settings, checks the data before Ray starts and reads them. Without Ray: catalogues and checks only."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest

from tests.helpers import build_root, local_locations, write_published
from thalia_ray.config import ConfigError, DataConfig, ThaliaConfig
from thalia_ray.data.cube import DataError
from thalia_ray.data.samples import Sample
from thalia_ray.data.shards.tar import ShardEntry, ShardError
from thalia_ray.data.sources import SOURCES, CubeSource, LabelledSource, OwnShards, PublishedShards, source_class

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return build_root(tmp_path_factory.mktemp("sources-root"))


def _cfg(root: str, **data: object) -> ThaliaConfig:
    return ThaliaConfig.model_validate({"data": {"root": root, "crop": 24, **data}})


def test_every_configurable_source_is_a_registered_class_and_every_class_is_configurable():
    names = typing.get_args(DataConfig.model_fields["source"].annotation)
    assert set(names) == set(SOURCES)
    assert SOURCES == {"cube": CubeSource, "shards": OwnShards, "published": PublishedShards}
    assert all(issubclass(cls, LabelledSource) and cls.name == name for name, cls in SOURCES.items())


def test_the_source_class_checks_its_settings(root):
    assert source_class(_cfg(root).data) is CubeSource
    for name in ("shards", "published"):
        with pytest.raises(ConfigError, match=f"data.source is '{name}' but data.shards .* is not set"):
            source_class(_cfg(root, source=name).data)
    with pytest.raises(ShardError, match="data.policy=resample .* use data.source=cube"):
        source_class(_cfg(root, source="shards", shards="/x", policy="resample").data)
    unknown = DataConfig.model_construct(**{**_cfg(root).data.model_dump(), "source": "parquet"})
    with pytest.raises(ConfigError, match="data.source 'parquet': no such source; the sources: cube, published, shards"):
        source_class(unknown)


def test_the_old_spelling_is_refused_with_the_new_one(root):
    with pytest.raises(ValueError, match="data.source: published"):
        _cfg(root, source="shards", shards="/x", shard_format="published")


def test_the_cube_source_checks_the_cubes_and_reads_its_index(root):
    cfg = _cfg(root)
    pools = CubeSource.preflight(cfg, local_locations(cfg.data), SPLITS)
    assert set(pools) == set(SPLITS) and all(pools[s] and isinstance(pools[s][0], Sample) for s in SPLITS)
    source = CubeSource.from_config(cfg, local_locations(cfg.data), SPLITS)
    assert [s.key for s in source.index.samples("val")] == [s.key for s in pools["val"]]
    too_big = _cfg(root, crop=64)  # the frames are 40 px
    with pytest.raises(ConfigError, match="data.crop 64 is larger than 2 frame"):
        CubeSource.preflight(too_big, local_locations(too_big.data), SPLITS)
    gone = _cfg(f"{root}-absent")
    with pytest.raises(DataError, match="data.root .*-absent: no such folder"):
        CubeSource.preflight(gone, local_locations(gone.data), SPLITS)


def test_shard_sources_name_a_missing_shard_root(root, tmp_path):
    for name in ("shards", "published"):
        cfg = _cfg(root, source=name, shards=str(tmp_path / "none"))
        with pytest.raises(ShardError, match="data.shards .*none: no such folder .*export the dataset first"):
            SOURCES[name].preflight(cfg, local_locations(cfg.data), SPLITS)


def test_published_shards_are_listed_before_ray_and_their_items_known_only_by_reading(root, tmp_path):
    out = str(tmp_path / "published")
    cfg = _cfg(root, source="published", shards=out)
    written = {split: write_published(out, cfg.data, split) for split in SPLITS}
    cls = source_class(cfg.data)
    assert cls is PublishedShards and not cls.items_known and CubeSource.items_known and OwnShards.items_known
    assert cls.preflight(cfg, local_locations(cfg.data), SPLITS) == {split: [] for split in SPLITS}
    source = cls.from_config(cfg, local_locations(cfg.data), ("val",))
    entries = source.entries["val"]
    assert [e.key for e in entries] == written["val"] and all(isinstance(e, ShardEntry) for e in entries)
    Path(out, "1", "val").rename(Path(out, "1", "val-moved"))
    with pytest.raises(ShardError, match="val"):
        cls.preflight(cfg, local_locations(cfg.data), SPLITS)
