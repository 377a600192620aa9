"""The node-local cache on its own: entries round-trip, damage is detected, the folder stays under its limit,
and processes filling one folder at once leave whole, identical entries."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from thalia_ray.node_cache import LOW_WATER, CacheSettings, CorruptEntry, NodeCache, entry_name


def _cache(tmp_path: Path, max_bytes: int = 10**9) -> NodeCache:
    return NodeCache(CacheSettings(str(tmp_path / "cache"), max_bytes))


def _entry_file(cache: NodeCache, key: str) -> Path:
    name = entry_name(key)
    return cache.root / name[:2] / name


def test_an_entry_round_trips_and_a_missing_one_is_none(tmp_path):
    cache = _cache(tmp_path)
    assert cache.get("a") is None
    cache.put("a", b"chunk bytes")
    assert bytes(cache.get("a")) == b"chunk bytes"
    assert cache.get("b") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_entry_is_refused_and_removed(tmp_path, damage):
    cache = _cache(tmp_path)
    cache.put("k", bytes(range(256)) * 4)
    path = _entry_file(cache, "k")
    blob = bytearray(path.read_bytes())
    if damage == "flip":
        blob[-10] ^= 0xFF
    elif damage == "truncate":
        blob = blob[:-1]
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptEntry):
        cache.get("k")
    assert not path.exists() and cache.get("k") is None  # gone: the caller refetches and stores it again


def test_trim_removes_least_recently_used_entries_down_to_the_low_water_mark(tmp_path):
    cache = _cache(tmp_path, max_bytes=10**9)
    for i in range(10):
        cache.put(f"k{i}", b"x" * 1000)
        os.utime(_entry_file(cache, f"k{i}"), (1000 + i, 1000 + i))  # k0 oldest
    cache.max_bytes = 5 * 1040  # room for five entries (header included)
    remaining = cache.trim()
    kept = [i for i in range(10) if _entry_file(cache, f"k{i}").exists()]
    assert remaining <= LOW_WATER * cache.max_bytes
    assert kept == list(range(10 - len(kept), 10)) and 0 < len(kept) < 5  # the newest survive


def test_writing_past_the_limit_trims_the_folder_by_itself(tmp_path):
    cache = _cache(tmp_path, max_bytes=20_000)
    for i in range(100):
        cache.put(f"k{i}", os.urandom(1000))
    assert cache.size() <= 20_000
    assert cache.get("k99") is not None  # the latest write is kept


def test_a_crashed_writers_temporary_file_is_removed_by_trim(tmp_path):
    cache = _cache(tmp_path, max_bytes=10**6)
    cache.put("k", b"data")
    orphan = _entry_file(cache, "k").parent / ".orphan.tmp"
    orphan.write_bytes(b"half")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    cache.trim()
    assert not orphan.exists() and cache.get("k") is not None


def _fill(root: str, seed: int) -> None:
    cache = NodeCache(CacheSettings(root, 10**9))
    for i in range(200):
        key = f"k{(i * 7 + seed) % 200}"
        cache.put(key, key.encode() * 500)
        got = cache.get(key)
        assert got is not None and bytes(got) == key.encode() * 500


def test_processes_filling_one_folder_at_once_leave_whole_identical_entries(tmp_path):
    root = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_fill, args=(root, seed)) for seed in (0, 1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    cache = NodeCache(CacheSettings(root, 10**9))
    for i in range(200):
        assert bytes(cache.get(f"k{i}")) == f"k{i}".encode() * 500
    assert not [p for p in Path(root).rglob("*.tmp")]


def test_a_range_of_a_whole_entry_is_read_alone_once_the_entry_is_checked(tmp_path):
    cache = _cache(tmp_path)
    data = bytes(range(256)) * 40
    cache.put("shard", data)
    assert cache.get_range("shard", 100, 300) == data[100:300]
    assert cache.get_range("shard", 10_000, None) == data[10_000:]
    assert cache.get_range("absent", 0, 10) is None
    path = _entry_file(cache, "shard")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))  # rewritten: a new modification time, so checked again
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    with pytest.raises(CorruptEntry):
        cache.get_range("shard", 0, 10)
    assert not path.exists()
