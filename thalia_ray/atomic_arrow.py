"""A pyarrow local filesystem whose streams write a file whole or not at all.

Ray Train writes its run snapshot (`ray_internals.TRAIN_SNAPSHOT`, the list of registered
checkpoints a rerun resumes from) with `storage_filesystem.open_output_stream` straight into place.
On a local or NFS store that fills up during that write, the previous snapshot is left empty and the
run can no longer be resumed. `AtomicLocalFileSystem` is pyarrow's `LocalFileSystem` with one change:
a stream opened from Python writes a temporary sibling and moves it into place only when every write,
the final flush and the writer's `with` block succeeded; otherwise the previous file stays as it was. It still is a
`LocalFileSystem`, so checkpoints open in place, and bulk copies (`pyarrow.fs.copy_files`, Ray's
checkpoint uploads) keep pyarrow's native path: Ray registers a checkpoint only once its copy finished.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class _WholeOrNothing:
    """A binary file written to `<path>.tmp-<id>`; `close` moves it to `path` unless a write failed or
    it was abandoned, and removes it then."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._complete = True

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except BaseException:
            self._complete = False
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except BaseException:
            self._complete = False
            raise

    def tell(self) -> int:
        return self._file.tell()

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._file.closed

    def abandon(self) -> None:
        self._complete = False

    def close(self) -> None:
        """Move the file into place if every write succeeded and it reached the disk, else remove it."""
        if self._file.closed:
            return
        try:
            if self._complete:
                self.flush()
                os.fsync(self._file.fileno())
        finally:
            with contextlib.suppress(OSError):  # a failed flush fails again on close; it was raised already
                self._file.close()
            if self._complete:
                os.replace(self.tmp, self.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.tmp)


class _WholeOrNothingStream(pa.PythonFile):
    """The stream Ray writes through: an exception inside its `with` block abandons the file."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        if exc_type is not None:
            self.target.abandon()
        return super().__exit__(exc_type, exc, tb)


class AtomicLocalFileSystem(pafs.LocalFileSystem):
    """`pyarrow.fs.LocalFileSystem` whose `open_output_stream` replaces a file only with a complete one.

    Compressed or buffered streams (which Ray does not ask for) are pyarrow's own, written in place.
    """

    def open_output_stream(self, path: str, compression: str | None = "detect", buffer_size: int | None = None,
                           metadata: dict[str, str] | None = None) -> pa.NativeFile:
        if buffer_size or _compressed(path, compression):
            return super().open_output_stream(path, compression, buffer_size, metadata)
        target = _WholeOrNothing(path)
        stream = _WholeOrNothingStream(target, mode="w")
        stream.target = target
        return stream

    def __reduce__(self) -> tuple[Any, ...]:
        # pyarrow's own reduce rebuilds the base class: Ray's controller and workers would write in place.
        return (AtomicLocalFileSystem, ())


def _compressed(path: str, compression: str | None) -> bool:
    """pyarrow's rule: "detect" compresses by the file's extension (`.gz`, `.bz2`, ...), None never."""
    if compression != "detect":
        return compression is not None
    try:
        pa.Codec.detect(path)
    except TypeError:  # pyarrow's way of saying the extension names no codec
        return False
    return True
