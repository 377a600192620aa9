from __future__ import annotations

import errno
import gzip
import json
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from thalia_ray.atomic_arrow import AtomicLocalFileSystem
from thalia_ray.ray_internals import TRAIN_SNAPSHOT as SNAPSHOT
from thalia_ray.storage import local


def _write(fs: pafs.FileSystem, path: Path, data: bytes) -> None:
    """What Ray Train does with its snapshot: one stream, one write."""
    with fs.open_output_stream(str(path)) as stream:
        stream.write(data)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as filler:
        with pytest.raises(OSError) as full:
            while True:
                filler.write(b"\0" * 2**20)
                filler.flush()
    assert full.value.errno == errno.ENOSPC


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_keeps_the_previous_snapshot_whole(small_disk):
    fs, root = local(str(small_disk)).pyarrow()  # what the store hands Ray
    assert isinstance(fs, AtomicLocalFileSystem)
    ours, plain = Path(root) / "ours" / SNAPSHOT, Path(root) / "plain" / SNAPSHOT
    for path in (ours, plain):
        path.parent.mkdir()
        _write(fs, path, json.dumps({"checkpoint_results": ["epoch_1"]}).encode())
    _fill(small_disk)
    bigger = json.dumps({"checkpoint_results": ["epoch_1", "x" * 2**20]}).encode()
    with pytest.raises(OSError, match="No space left"):
        _write(fs, ours, bigger)
    assert json.loads(ours.read_text()) == {"checkpoint_results": ["epoch_1"]}
    assert _leftovers(ours.parent) == []
    # pyarrow's own local filesystem, which Ray would get otherwise, truncates the file it fails to write.
    with pytest.raises(OSError):
        _write(pafs.LocalFileSystem(), plain, bigger)
    assert len(plain.read_bytes()) < len(bigger)


def test_an_error_inside_the_stream_keeps_the_previous_file(tmp_path):
    fs, path = AtomicLocalFileSystem(), tmp_path / SNAPSHOT
    _write(fs, path, b'{"old": true}')
    with pytest.raises(RuntimeError):
        with fs.open_output_stream(str(path)) as stream:
            stream.write(b'{"new": ')
            raise RuntimeError("the writer failed half-way")
    assert path.read_bytes() == b'{"old": true}' and _leftovers(tmp_path) == []
    stream = fs.open_output_stream(str(path))  # closed without `with`: complete, so it replaces the file
    stream.write(b'{"new": true}')
    stream.close()
    assert path.read_bytes() == b'{"new": true}'


def test_it_travels_to_ray_processes_as_itself_and_keeps_pyarrows_rules(tmp_path):
    fs = pickle.loads(pickle.dumps(AtomicLocalFileSystem()))
    # Still a LocalFileSystem: Ray opens checkpoints in place instead of copying them to a temporary folder.
    assert type(fs) is AtomicLocalFileSystem and isinstance(fs, pafs.LocalFileSystem)
    _write(fs, tmp_path / "table.csv.gz", b"a,b\n1,2\n")  # pyarrow compresses by the extension
    assert gzip.decompress((tmp_path / "table.csv.gz").read_bytes()) == b"a,b\n1,2\n"
