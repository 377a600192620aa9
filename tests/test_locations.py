"""Storage settings travel with the data locations: a dataset on S3 whose endpoint is given only
in the configuration (`storage.endpoint_url`, no AWS_ENDPOINT_URL in the environment) is indexed,
its statistics computed, and its samples read from cubes and from shards."""
from __future__ import annotations

import os

import numpy as np

from thalia_ray.config import ThaliaConfig
from thalia_ray.data import pipeline
from thalia_ray.data.cube import get_cache, read_sample
from thalia_ray.data.index import SampleIndex, index_counts
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.shards.export import export_shards
from thalia_ray.data.shards.manifest import load_manifest, manifest_entries, shard_root
from thalia_ray.data.shards.npy import decode_own
from thalia_ray.data.shards.tar import fetch_ranges, parse_members
from thalia_ray.data.stats import compute_statistics
from thalia_ray.storage import S3Options, resolve

from tests.helpers import ROOT_SIZE, build_root, upload_folder

DATA = {"crop": 24, "length": 1, "samples_per_read_task": 4, "atmospheric": ["surface_pressure"]}


def test_endpoint_only_in_config_reaches_index_statistics_cubes_and_shards(
        tmp_path, s3_bucket, moto_endpoint, ray_cluster, monkeypatch):
    local = build_root(tmp_path / "root", chunk=ROOT_SIZE)
    upload_folder(local, f"{s3_bucket}/root")  # through the environment's endpoint, removed below
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert "AWS_ACCESS_KEY_ID" in os.environ  # credentials stay in the environment
    cfg = ThaliaConfig.model_validate({"seed": 3, "data": {**DATA, "root": f"{s3_bucket}/root"},
                                       "storage": {"endpoint_url": moto_endpoint}})
    locations = DataLocations.of(cfg.data, S3Options.of(cfg.storage))
    assert locations.root.s3.endpoint_url == moto_endpoint and locations.statistics.s3 == locations.root.s3

    # index and counts
    index = SampleIndex.from_config(cfg.data, cfg.seed, location=locations.root)
    local_index = SampleIndex.from_config(cfg.data.model_copy(update={"root": local}), cfg.seed)
    assert [s.key for s in index.samples("val")] == [s.key for s in local_index.samples("val")]
    assert index_counts(locations.root, 1) == local_index.counts()

    # statistics: computed from the S3 cubes, written next to them
    stats = compute_statistics(cfg.data, locations, split="train", seed=cfg.seed)
    assert locations.statistics.read_json() == stats and set(stats) >= {"insar_difference", "surface_pressure"}

    # a sample from the cubes, equal to the local read
    sample = index.samples("val")[0]
    remote = read_sample(sample, index.annotations, get_cache(locations.root), cfg.data)
    direct = read_sample(sample, local_index.annotations, get_cache(local), cfg.data)
    np.testing.assert_array_equal(remote.image, direct.image)
    np.testing.assert_array_equal(remote.mask, direct.mask)

    # shards exported to S3, read back by ranged reads and through the pipeline
    out = resolve(f"{s3_bucket}/shards", S3Options.of(cfg.storage))
    report = export_shards(cfg.data, locations, out, length=1, splits=("val",), samples_per_shard=4)
    assert report.samples == {"val": len(index.samples("val"))} and not report.skipped
    manifest = load_manifest(out, 1)
    entries = manifest_entries(manifest, shard_root(out, 1), "val")
    for entry, blob in fetch_ranges(entries[:2]):
        raw = decode_own(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, cfg.data.channels,
                         manifest["channels"])
        expected = read_sample(index.samples("val")[entry.order], local_index.annotations, get_cache(local), cfg.data)
        np.testing.assert_array_equal(raw.image, expected.image)
    from_shards = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "shards", "shards": out.url})})
    for run_cfg in (cfg, from_shards):
        data = pipeline.build_datasets(run_cfg, splits=("val",))
        got = [str(k) for b in data.datasets["val"].iter_batches(batch_size=None, batch_format="numpy")
               for k in b["key"]]
        assert got == [s.key for s in index.samples("val")]
        assert pipeline.bad_sample_report(data.epoch_control)["epochs"] == {}
