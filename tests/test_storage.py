"""Storage: the same behaviour on local disk and on a real S3 endpoint (moto over HTTP)."""
from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest

from thalia_ray.bench.s3server import free_port
from thalia_ray.config import StorageConfig
from thalia_ray.storage import Location, S3Options, StorageError, local, resolve, walk_files


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return local(tmp_path / "store")
    return resolve(f"{request.getfixturevalue('s3_bucket')}/prefix", S3Options.from_environment())


# ------------------------------------------------------------------------------------- resolve
def test_resolve_local_forms(tmp_path):
    plain = local(tmp_path / "a")
    assert plain.protocol == "file" and plain.path == str(tmp_path / "a")
    assert local(f"file://{tmp_path}/a").path == plain.path
    assert local(plain) is plain


def test_a_file_url_without_a_leading_slash_is_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local("file://data/x").path == str(tmp_path / "data" / "x")
    assert local("file://runs").path == str(tmp_path / "runs")
    assert local("file://localhost/abs/p").path == "/abs/p"


def test_resolve_s3_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:1")
    assert resolve("s3://b/p", S3Options.from_environment()).s3.endpoint_url == "http://from-env:1"
    cfg = StorageConfig(endpoint_url="http://from-config:2", region="eu-west-1")
    loc = resolve("s3://b/p/", S3Options.of(cfg))
    assert (loc.s3.endpoint_url, loc.s3.region, loc.path) == ("http://from-config:2", "eu-west-1", "b/p")
    query = resolve("s3://b/p?endpoint_override=127.0.0.1:9&scheme=http", S3Options.of(cfg))
    assert query.s3.endpoint_url == "http://127.0.0.1:9"


def test_settings_are_resolved_once_and_carried_by_every_location(monkeypatch, tmp_path):
    """The environment fills what a configuration leaves unset, when the settings are made; a location, its
    children and parent carry them; an s3:// text is never turned into a location without them."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:1")
    settings = S3Options.of(StorageConfig(region="eu-west-1", timeout_s=7))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://changed-later:3")
    loc = resolve("s3://b/p", settings)
    assert loc.s3 == settings and (settings.endpoint_url, settings.region, settings.timeout_s) == \
        ("http://from-env:1", "eu-west-1", 7)
    assert loc.join("x", "y").s3 == settings and loc.join("x").parent().s3 == settings
    assert resolve(tmp_path, settings).s3 == settings
    with pytest.raises(StorageError, match="resolve it with the storage settings"):
        local("s3://b/p")


@pytest.mark.parametrize("url, words", [("s3:///nobucket", "needs a bucket"), ("ftp://host/x", "unsupported")])
def test_resolve_rejects_bad_locations(url, words):
    with pytest.raises(StorageError, match=words):
        resolve(url, S3Options.from_environment())


# ------------------------------------------------------------------------------------- round trips
def test_bytes_text_json_round_trip(root):
    blob = bytes(range(256)) * 64
    root.join("a", "blob.bin").write_bytes(blob)
    root.join("a", "note.txt").write_text("Ætna ✓")
    root.join("b.json").write_json({"x": [1, 2.5, None], "y": "z"})
    assert root.join("a", "blob.bin").read_bytes() == blob
    assert root.join("a/note.txt").read_text() == "Ætna ✓"
    assert root.join("b.json").read_json() == {"x": [1, 2.5, None], "y": "z"}
    assert root.join("a", "blob.bin").size() == len(blob)
    with root.join("a", "blob.bin").open("rb") as handle:
        assert handle.read(10) == blob[:10]


def test_list_glob_exists_join_walk(root):
    for name in ("x/1.json", "x/2.json", "x/3.txt", "x/deep/4.json"):
        root.join(name).write_json({"name": name})
    x = root.join("x")
    assert x.list() == ["1.json", "2.json", "3.txt", "deep"]
    assert [loc.name for loc in x.glob("*.json")] == ["1.json", "2.json"]
    assert x.glob("*.json")[0].read_json() == {"name": "x/1.json"}
    assert x.exists() and x.join("deep", "4.json").exists()
    assert not x.join("missing.json").exists()
    assert root.join("nothing-here").list() == []
    assert x.join("deep").parent().url == x.url
    found = [loc.path.removeprefix(x.path + "/") for loc in walk_files(x)]
    assert found == ["1.json", "2.json", "3.txt", "deep/4.json"]
    x.join("deep").remove(recursive=True)
    assert x.list() == ["1.json", "2.json", "3.txt"]


def test_missing_file_is_file_not_found_naming_it(root):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        root.join("absent.json").read_json()


def test_invalid_json_names_location(root):
    bad = root.join("bad.json")
    bad.write_text("{not json")
    with pytest.raises(StorageError, match="bad.json: not valid JSON"):
        bad.read_json()


def test_put_file_uploads_whole_file(root, tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(os.urandom(100_000))
    target = root.join("up", "copy.bin")
    target.put_file(source)
    assert target.read_bytes() == source.read_bytes()


def test_zarr_store_round_trip(root):
    import zarr

    data = np.arange(2 * 6 * 5, dtype="float32").reshape(2, 6, 5)
    cube = root.join("frame.zarr")
    group = zarr.open_group(cube.zarr_store(read_only=False), mode="w")
    group.create_array("insar_difference", data=data, chunks=(1, 3, 5))
    group.attrs["frame_id"] = "124D_04854_171313"
    reread = zarr.open_group(cube.zarr_store(read_only=True), mode="r")
    np.testing.assert_array_equal(reread["insar_difference"][:], data)
    np.testing.assert_array_equal(reread["insar_difference"][1, 2:4], data[1, 2:4])
    assert reread.attrs["frame_id"] == "124D_04854_171313"
    assert cube.join("zarr.json").exists()


def test_pyarrow_filesystem_sees_the_same_objects(root):
    import pyarrow.fs as pafs

    root.join("shared", "from-fsspec.json").write_json({"side": "fsspec"})
    fs, path = root.join("shared").pyarrow()
    with fs.open_input_stream(f"{path}/from-fsspec.json") as stream:
        assert b'"fsspec"' in stream.read()
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/from-arrow.bin") as stream:
        stream.write(b"arrow bytes")
    root.join("shared").invalidate()
    assert root.join("shared", "from-arrow.bin").read_bytes() == b"arrow bytes"
    infos = fs.get_file_info(pafs.FileSelector(path))
    assert sorted(i.base_name for i in infos) == ["from-arrow.bin", "from-fsspec.json"]


# ------------------------------------------------------------------------------------- atomicity
def test_reader_only_sees_complete_versions(root):
    """A reader polling during many rewrites of a large file sees whole versions only."""
    size = 4 * 2**20 if root.protocol == "file" else 2**20
    rewrites = 24 if root.protocol == "file" else 8
    target = root.join("big.bin")
    target.write_bytes(bytes([0]) * size)
    seen: set[int] = set()
    problems: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            data = target.read_bytes()
            if len(data) != size or data.count(data[:1]) != size:
                problems.append(f"partial or mixed read: {len(data)} bytes")
            seen.add(data[0])

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in range(1, rewrites + 1):
            target.write_bytes(bytes([version]) * size)
    finally:
        done.set()
        thread.join()
    assert problems == []
    assert len(seen) >= 2  # the reader really overlapped the rewrites
    assert target.read_bytes() == bytes([rewrites]) * size
    assert target.parent().list() == ["big.bin"]  # no temporary files left behind


def test_failed_local_write_keeps_previous_version(tmp_path, monkeypatch):
    target = local(tmp_path / "run" / "history.json")
    target.write_json({"version": 1})

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match=f"cannot write {target.url}: No space left on device"):
        target.write_json({"version": 2})
    monkeypatch.undo()
    assert target.read_json() == {"version": 1}
    assert os.listdir(tmp_path / "run") == ["history.json"]


# ------------------------------------------------------------------------------------- errors
def test_unreachable_endpoint_names_location():
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}")
    loc = resolve("s3://some-bucket/runs/x.json", S3Options.of(cfg))
    with pytest.raises(StorageError) as err:
        loc.read_json()
    message = str(err.value)
    assert "s3://some-bucket/runs/x.json" in message
    assert cfg.endpoint_url in message and "unreachable" in message


def test_missing_bucket_is_clear(s3_env):
    loc = resolve(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x/run.json", S3Options.from_environment())
    with pytest.raises(StorageError, match="bucket does not exist") as err:
        loc.write_json({"a": 1})
    assert loc.url in str(err.value)
    with pytest.raises(StorageError, match="bucket does not exist"):
        loc.read_bytes()


def test_access_denied_is_clear(strict_s3_endpoint, s3_env):
    loc = resolve("s3://private/data/a.json", S3Options.of(StorageConfig(endpoint_url=strict_s3_endpoint)))
    for action in (loc.read_bytes, lambda: loc.write_json({"a": 1}), loc.list):
        with pytest.raises(StorageError, match="access denied") as err:
            action()
        assert "s3://private/data/a.json" in str(err.value)
        assert "AWS_ACCESS_KEY_ID" in str(err.value)


# ------------------------------------------------------------------------------------- frozen endpoint
def test_a_silent_endpoint_gives_a_clear_error_within_the_limit(s3_env, tmp_path):
    """An endpoint that accepts connections and never answers: every kind of call, the S3 clients' own
    retries included, ends in a StorageError naming the limit within `storage.timeout_s`."""
    from tests.helpers import silent_endpoint
    from thalia_ray.data.cube import CubeCache
    from thalia_ray.errors import ThaliaError

    with silent_endpoint() as url:
        cfg = StorageConfig(endpoint_url=url, timeout_s=3)
        loc = resolve("s3://frozen/data/run.json", S3Options.of(cfg))
        calls = {"exists": loc.exists, "read": loc.read_bytes, "write": lambda: loc.write_json({"a": 1}),
                 "list": loc.parent().list, "upload": lambda: loc.put_file(__file__)}
        for name, call in calls.items():
            began = time.monotonic()
            with pytest.raises(StorageError, match=r"no answer within 3 s \(storage.timeout_s\)") as err:
                call()
            assert time.monotonic() - began < 5, name
            assert url in str(err.value) and "s3://frozen/data" in str(err.value)
        # Zarr goes through the asynchronous client, bounded by its timeouts per request: opening a cube
        # tries a few metadata keys in a row, so it ends after a few limits, not never.
        began = time.monotonic()
        with pytest.raises(ThaliaError, match="cube s3://frozen/cubes/f1.zarr"):
            CubeCache(resolve("s3://frozen/cubes", S3Options.of(cfg))).get("f1")
        assert time.monotonic() - began < 3 * 5
