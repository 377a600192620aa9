"""Input-pipeline benchmarks: samples/s delivered to one worker, and worker memory vs dataset size.

(a) cube windowed reads (open once, read only the crop's chunks) against what the original code
    does per sample (open the cube, load whole frames of the selected pairs, crop in memory);
(b) our shards (ranged read, `.npy` members) against the published format (`torch.load` of `.pth`
    members), same samples, same crops.
These are the per-repetition building blocks; `thalia_ray.bench.suites` interleaves them through the
harness. Peak memory: a fresh worker streams every sample of a 1× and a 4× shard set (the same shards
listed four times in its catalogue), reporting its peak RSS.
"""
from __future__ import annotations

import resource
from typing import Any

import numpy as np

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import CubeCache, crop_window, read_sample
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.shards.npy import decode_own
from thalia_ray.data.shards.published import decode_published, published_members
from thalia_ray.data.shards.tar import ShardEntry, fetch_ranges, parse_members, write_tar


def original_read(sample: Any, index: SampleIndex, data_cfg: DataConfig) -> np.ndarray:
    """The original per-sample path: open the cube, select the dates, load whole frames, crop."""
    import xarray as xr

    from thalia_ray.storage import local

    store = local(data_cfg.root).join(f"{sample.frame_id}.zarr").zarr_store(read_only=True)
    cube = xr.open_zarr(store, consolidated=None)
    dates = {schema.PRIMARY_DIM: np.datetime64(f"{sample.primary_date[:4]}-{sample.primary_date[4:6]}-{sample.primary_date[6:]}"),
             schema.SECONDARY_DIM: [np.datetime64(f"{d[:4]}-{d[4:6]}-{d[6:]}") for d in sample.secondary_dates]}
    selected = cube.sel(dates)[data_cfg.channels + [schema.MASK_VAR]]
    frames = [np.broadcast_to(selected[v].values, (len(sample.secondary_dates), *selected[v].shape[-2:]))
              for v in data_cfg.channels + [schema.MASK_VAR]]
    window = crop_window(sample, index.annotations, frames[0].shape[-2:], data_cfg.crop, None, data_cfg.mask_target)
    stack = np.stack(frames, axis=1)
    return stack[..., window.row:window.row + window.height, window.col:window.col + window.width]


def windowed_read(sample: Any, index: SampleIndex, data_cfg: DataConfig, cache: CubeCache) -> np.ndarray:
    return read_sample(sample, index.annotations, cache, data_cfg).image


def published_tar(path: str, raws: list[Any], data_cfg: DataConfig) -> list[ShardEntry]:
    """The same samples in the published member layout (image/labels/sample `.pth`), each sample
    dict holding its real annotation records, as the original exporter pickles them."""
    from thalia_ray.storage import local

    records = local(data_cfg.root).join(schema.ANNOTATIONS_FILE).read_json()
    items = [(raw.key, published_members(raw, [records[str(u)] for u in raw.meta["unique_ids"]]))
             for raw in raws]
    ranges = write_tar(path, items)
    return [ShardEntry(k, local(path), off, size, 0, i) for i, (k, off, size) in enumerate(ranges)]


def read_published(entries: list[ShardEntry], data_cfg: DataConfig) -> int:
    """The baseline: every sample decoded from its `.pth` members (safe `torch.load`) to a RawSample."""
    for entry, blob in fetch_ranges(entries):
        decode_published(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, data_cfg, "val")
    return len(entries)


def read_own(entries: list[ShardEntry], channels: list[str], stored: list[str]) -> int:
    """Our path: every sample decoded from its `.npy`/`.json` members to a RawSample."""
    for entry, blob in fetch_ranges(entries):
        decode_own(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, channels, stored)
    return len(entries)


def stream_peak_rss(entries: list[ShardEntry], channels: list[str], chunk: int) -> dict[str, float]:
    """Ray task body: stream every entry in read-task-sized chunks; report the peak RSS (MiB)."""
    for start in range(0, len(entries), chunk):
        read_own(entries[start:start + chunk], channels, channels)
    return {"samples": len(entries), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
