"""Cube reads from a bucket at a distance: `rclone serve s3` over the synthetic dataset, behind the
latency/fault proxy on 127.0.0.1, read over real HTTP. What comes back must be what local disk holds,
whether it came from the bucket, the node-local cache, a cache that was damaged or filled by two readers
at once, or through throttling, dropped connections and stalls, and the counts must say what happened."""
from __future__ import annotations

import asyncio
import gc
import multiprocessing
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from zarr.core.sync import sync

from thalia_ray.bench import remote
from thalia_ray.bench.proxy import Distance, ProxyThread
from thalia_ray.bench.s3server import S3Server
from thalia_ray.config import load_config
from thalia_ray.data.cube import CubeCache, read_sample
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.locations import DataLocations
from thalia_ray.storage import S3Options
from thalia_ray.store import format_run
from thalia_ray.traffic import TRAFFIC, Traffic

CHUNKS = "/c/"  # in the request line of every Zarr v3 chunk GET (metadata has none)
DATA = ["data.length=3", "data.crop=48", "data.atmospheric=[]"]


@pytest.fixture(scope="module")
def bucket(synthetic_root, s3_env, tmp_path_factory) -> Iterator[S3Server]:
    """rclone serving the synthetic dataset as bucket `remote.BUCKET`, with the session's test credentials
    (the ones Ray's workers have)."""
    served = remote.bucket_root(str(synthetic_root), str(tmp_path_factory.mktemp("served")))
    with S3Server(served, key=s3_env["AWS_ACCESS_KEY_ID"], secret=s3_env["AWS_SECRET_ACCESS_KEY"]) as server:
        yield server


def _config(root: str, endpoint: str | None = None, cache: Path | None = None, **storage: Any) -> Any:
    overrides = [f"data.root={root}", *DATA]
    if endpoint:
        overrides += remote.remote_overrides(endpoint, str(cache) if cache else None)
    overrides += [f"storage.{k}={v}" for k, v in storage.items()]
    return load_config(None, overrides)


def _samples(synthetic_root: Path) -> list[Any]:
    cfg = _config(str(synthetic_root))
    index = SampleIndex.from_config(cfg.data, 0)
    return [s for split in ("train", "val") for s in index.samples(split)][:12]


def _read(cfg: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every test sample through a fresh reader of `cfg`'s data root (nothing kept from earlier reads)."""
    locations = DataLocations.of(cfg.data, S3Options.of(cfg.storage))
    index = SampleIndex.from_config(cfg.data, 0, location=locations.root)
    cache = CubeCache(locations.root)
    samples = [s for split in ("train", "val") for s in index.samples(split)][:12]
    return [(raw.image, raw.mask) for raw in (read_sample(s, index.annotations, cache, cfg.data) for s in samples)]


def _counted(cfg: Any) -> tuple[list[tuple[np.ndarray, np.ndarray]], Traffic]:
    before = TRAFFIC.snapshot()
    reads = _read(cfg)
    return reads, TRAFFIC.snapshot() - before


def _same(a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]]) -> None:
    assert len(a) == len(b) > 0
    for (image_a, mask_a), (image_b, mask_b) in zip(a, b):
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(mask_a, mask_b)


@pytest.fixture(scope="module")
def local(synthetic_root) -> list[tuple[np.ndarray, np.ndarray]]:
    return _read(_config(str(synthetic_root)))


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")]


FAULTS = Distance(slowdown=0.08, reset=0.05, stall=0.02, stall_s=2.0, seed=11, fault_paths=CHUNKS)


def _assert_counts_match(counts: Traffic, injected: Any) -> None:
    """Every fault the proxy injected was seen and retried once. Its kind is as injected, but for some
    503s whose connection the HTTP client reports as broken instead (hyper; up to about 1 in 10 under a
    heavy fault mix), so those count as resets: a fault is never lost, only relabelled that way."""
    assert injected.slowdown > 0 and injected.reset > 0
    assert counts.retries == counts.throttles + counts.resets + counts.timeouts
    assert counts.retries == injected.slowdown + injected.reset + injected.stall
    assert counts.timeouts == injected.stall  # a stall outlasts the request deadline
    assert counts.throttles + counts.resets == injected.slowdown + injected.reset
    assert injected.slowdown * 3 // 4 <= counts.throttles <= injected.slowdown


def test_cached_reads_return_what_an_uncached_read_and_local_disk_return(bucket, local, tmp_path):
    with ProxyThread(bucket.port, Distance(latency_s=0.01)) as proxy:
        uncached, plain = _counted(_config(f"s3://{remote.BUCKET}", proxy.url))
        cold, first = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, tmp_path / "cache"))
        warm, second = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, tmp_path / "cache"))
    _same(uncached, local)
    _same(cold, local)
    _same(warm, local)
    assert plain.cache_hits == 0 and plain.requests > 0
    chunk_gets = first.requests - first.cache_hits  # the cold pass fetched each distinct chunk once
    assert first.cache_hits > 0  # samples sharing pairs (and the DEM) already hit in the cold pass
    assert second.requests < first.requests and second.cache_hits == first.cache_hits + len(_entries(tmp_path / "cache"))
    assert second.bytes < first.bytes / 10 and chunk_gets > 0  # only metadata came from the bucket
    assert not second.retries


def test_a_corrupted_cache_entry_is_detected_and_fetched_again(bucket, local, tmp_path):
    cache = tmp_path / "cache"
    with ProxyThread(bucket.port, Distance()) as proxy:
        cfg = _config(f"s3://{remote.BUCKET}", proxy.url, cache)
        _read(cfg)
        entries = _entries(cache)
        for path in entries[::2]:
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 0x55
            path.write_bytes(bytes(blob))
        damaged, counts = _counted(cfg)
        healed, after = _counted(cfg)
    _same(damaged, local)
    _same(healed, local)
    assert counts.cache_corrupt == len(entries[::2]) > 0
    assert after.cache_corrupt == 0 and after.cache_hits >= counts.cache_hits + counts.cache_corrupt  # rewritten whole


def test_two_nodes_caches_are_filled_and_read_each_by_its_own_readers(bucket, local, tmp_path):
    """Two nodes' caches (one folder each, as on each node's own disk) in one reader process: the second
    node's first pass fetches what the first node already holds (nothing of one cache answers for the
    other, not even through the process's reader or cache handles), and once the first node's folder
    is gone the second node still reads everything from its own."""
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    with ProxyThread(bucket.port, Distance()) as proxy:
        cold_a, fill_a = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, node_a))
        cold_b, fill_b = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, node_b))
        held_a, held_b = sorted(p.name for p in _entries(node_a)), sorted(p.name for p in _entries(node_b))
        for path in _entries(node_a):
            path.unlink()
        warm_b, again_b = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, node_b))
    for reads in (cold_a, cold_b, warm_b):
        _same(reads, local)
    fetched = fill_a.requests - fill_a.cache_hits
    assert fetched > 0 and (fill_b.requests, fill_b.cache_hits, fill_b.bytes) == (fill_a.requests, fill_a.cache_hits,
                                                                                   fill_a.bytes)
    assert held_a == held_b and 0 < len(held_b) <= fetched  # each node keeps its own copy of what it fetched
    assert again_b.cache_hits == fill_b.cache_hits + len(_entries(node_b)) and again_b.bytes < fill_b.bytes / 10


def _read_into(root: str, endpoint: str, cache: str, out: Any) -> None:
    cfg = _config(root, endpoint, Path(cache))
    out.put([(image.tobytes(), mask.tobytes()) for image, mask in _read(cfg)])


def test_two_readers_filling_one_cache_at_once_read_identical_samples(bucket, local, tmp_path):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    cache = tmp_path / "cache"
    with ProxyThread(bucket.port, Distance(latency_s=0.005)) as proxy:
        readers = [context.Process(target=_read_into, args=(f"s3://{remote.BUCKET}", proxy.url, str(cache), results))
                   for _ in range(2)]
        for reader in readers:
            reader.start()
        got = [results.get(timeout=120) for _ in readers]
        for reader in readers:
            reader.join(30)
            assert reader.exitcode == 0
        from_cache, counts = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, cache))
    expected = [(image.tobytes(), mask.tobytes()) for image, mask in local]
    assert got[0] == expected and got[1] == expected
    _same(from_cache, local)
    assert counts.cache_corrupt == 0 and counts.cache_hits > 0


def test_throttling_resets_and_stalls_are_retried_and_counted_as_they_happened(bucket, local):
    faults = Distance(slowdown=0.15, reset=0.1, stall=0.05, stall_s=2.0, seed=7, fault_paths=CHUNKS)
    with ProxyThread(bucket.port, faults) as proxy:
        reads, counts = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, request_timeout_s=1.0))
        injected = proxy.stats()
    _same(reads, local)  # every sample, exactly as stored
    assert injected.slowdown > 0 and injected.reset > 0 and injected.stall > 0
    _assert_counts_match(counts, injected)
    # the proxy also saw the driver's reads of the index (not the data path's); none of the data path's was hidden
    assert injected.requests - 20 < counts.requests <= injected.requests



async def _collect_garbage() -> None:
    gc.collect()
    await asyncio.sleep(1.0)  # the close of what was collected runs meanwhile


def test_a_faulted_read_leaves_no_unretrieved_task_behind(bucket, local, caplog, capfd):
    """A reader process drops the filesystems of endpoints it no longer reads (e.g. an earlier run's),
    and the garbage collector frees them in whichever thread allocates: in a reader, mostly Zarr's
    event loop. s3fs then closed their S3 clients on that loop, where the close failed and asyncio
    logged "Task exception was never retrieved" (seen in Ray workers' logs)."""
    from thalia_ray import storage

    with ProxyThread(bucket.port, FAULTS) as proxy:
        reads, counts = _counted(_config(f"s3://{remote.BUCKET}", proxy.url, request_timeout_s=1.0))
        storage._s3fs.cache_clear()  # its filesystems (index, cube metadata) are dropped ...
        sync(_collect_garbage())  # ... and collected on Zarr's loop
        gc.collect()
    _same(reads, local)
    assert counts.retries > 0 and counts.requests > len(reads)
    logged = [r.getMessage() for r in caplog.records]
    assert not [m for m in logged if "never retrieved" in m or "different loop" in m], logged
    assert "never retrieved" not in capfd.readouterr().err


@pytest.mark.slow
def test_every_epoch_through_faults_delivers_each_sample_once_and_counts_each_retry(ray_cluster, bucket):
    from thalia_ray.data import pipeline

    with ProxyThread(bucket.port, FAULTS) as proxy:
        cfg = load_config(None, [f"data.root=s3://{remote.BUCKET}", *DATA, "data.samples_per_read_task=8",
                                 *remote.remote_overrides(proxy.url, None), "storage.request_timeout_s=1.0"])
        data = pipeline.build_datasets(cfg, splits=("train",))
        planned = {epoch: sorted(s.key for s in data.sources["train"].items(epoch)) for epoch in (0, 1)}
        delivered = {}
        for epoch in (0, 1):
            pipeline.set_epoch(data.epoch_control, epoch)
            delivered[epoch] = sorted(str(k) for batch in data.datasets[pipeline.lane_name("train", epoch)]
                                      .iter_batches(batch_size=None, batch_format="numpy") for k in batch["key"])
        counts = sum((pipeline.epoch_traffic(data.epoch_control, e) for e in (0, 1)), Traffic())
        injected = proxy.stats()
    assert delivered == planned  # every sample of each epoch exactly once, none skipped
    assert pipeline.bad_sample_report(data.epoch_control)["epochs"] == {}
    _assert_counts_match(counts, injected)


@pytest.mark.slow
def test_a_training_run_through_faults_records_its_traffic_and_retries_per_epoch(ray_cluster, bucket, tmp_path):
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.trainer import fit

    with ProxyThread(bucket.port, FAULTS) as proxy:
        cfg = load_config(None, [*remote.train_overrides(
            {"length": 1, "crop": 32, "model": "mobilenetv3_small", "batch_size": 8, "epochs": 2, "cpus_per_worker": 1,
             "balance": True},
            f"s3://{remote.BUCKET}", str(tmp_path / "store")),
            "data.samples_per_read_task=16", "runtime.num_cpus=2",  # whole epochs: every read is counted
            *remote.remote_overrides(proxy.url, str(tmp_path / "cache")), "storage.request_timeout_s=1.0"])
        result = fit(cfg, store=ExperimentStore(str(tmp_path / "store")))
        injected = proxy.stats()
    history = result.history
    assert len(history) == 2 and all(row["storage/requests"] > 0 for row in history)
    total = Traffic.total(history)
    _assert_counts_match(total, injected)
    assert history[1]["storage/cache_hits"] > 0  # the second epoch found chunks the first one fetched
    record = ExperimentStore(str(tmp_path / "store")).run(result.run_id)
    assert record.read_results()["storage"]["retries"] == total.retries
    assert "storage   " in format_run(record) and "retries" in str(result)


def test_shard_ranges_come_from_the_shard_the_node_keeps_whole(s3_env, tmp_path):
    from thalia_ray.data.shards.tar import ShardEntry, _VERIFIED, fetch_ranges, file_sha256, write_tar
    from thalia_ray.storage import S3Options, local, resolve

    shards = tmp_path / "served" / "shards"
    shards.mkdir(parents=True)
    samples = [(f"s{i:03d}", {"image.bin": bytes([i]) * 5000, "meta.json": b"{}"}) for i in range(40)]
    ranges = write_tar(str(shards / "a.tar"), samples)
    digest = file_sha256(str(shards / "a.tar"))
    with S3Server(str(tmp_path / "served"), key=s3_env["AWS_ACCESS_KEY_ID"],
                  secret=s3_env["AWS_SECRET_ACCESS_KEY"]) as server, ProxyThread(server.port, Distance()) as proxy:
        cfg = _config("s3://shards", proxy.url, tmp_path / "cache")
        tar = resolve("s3://shards/a.tar", S3Options.of(cfg.storage))
        entries = [ShardEntry(k, tar, off, size, 0, i, digest) for i, (k, off, size) in enumerate(ranges)]
        reads = []
        for picked in (entries[::3], entries[1::3]):  # two tasks' samples: different byte ranges
            _VERIFIED.clear()  # as in a fresh reader process
            before = TRAFFIC.snapshot()
            reads.append(({e.key: bytes(b) for e, b in fetch_ranges(picked)}, TRAFFIC.snapshot() - before))
    local_entries = [ShardEntry(k, local(str(shards / "a.tar")), o, n, 0, i) for i, (k, o, n) in enumerate(ranges)]
    local = {e.key: bytes(b) for e, b in fetch_ranges(local_entries)}
    (first, cold), (second, warm) = reads
    assert len(first) == len(entries[::3]) and first == {k: local[k] for k in first}
    assert len(second) == len(entries[1::3]) and second == {k: local[k] for k in second}
    # one coalesced run per task: the shard is fetched whole once (to check its digest), the run is cut from it
    assert (cold.requests, cold.cache_hits) == (1, 1)
    assert (warm.requests, warm.cache_hits) == (0, 2)  # the whole shard from the cache, then the run
