"""The Zarr store of a cube in object storage: its reads go through `object_reads` (counted, retried,
many in flight; chunks also cached on the node), listings through Zarr's own fsspec store.

Zarr asks its store for each chunk a read needs, all of a sample's variables at once (`Cube.read_many`
gathers them), so a sample costs one round trip of concurrent GETs, one per chunk under its crop;
metadata is read once, when a process opens the cube. Chunks are cached under the cube's
*generation* (the ETag and modification time of its root metadata document), so a cube rewritten in
place is fetched anew rather than answered from old entries.
"""
from __future__ import annotations

import asyncio
from typing import Any, Iterable

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest
from zarr.storage import WrapperStore

from thalia_ray.object_reads import ObjectReader, object_reader
from thalia_ray.storage import Location

_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")


def cube_generation(location: Location) -> str:
    """The ETag and modification time of the cube's root metadata (v3 `zarr.json`, else v2 `.zgroup`)."""
    for name in ("zarr.json", ".zgroup"):
        try:
            info = location.join(name).info()
        except FileNotFoundError:
            continue
        return f"{info.get('ETag', '')}@{info.get('LastModified', '')}"
    return ""


class RemoteChunks(WrapperStore):
    """Chunk reads of an FsspecStore over S3 go through an ObjectReader (see the module docstring)."""

    def __init__(self, store: Any, reader: ObjectReader, path: str, generation: str) -> None:
        super().__init__(store)
        self.reader, self.path, self.generation = reader, path.rstrip("/"), generation

    @classmethod
    def over(cls, location: Location, store: Any) -> "RemoteChunks":
        return cls(store, object_reader(location.s3), location.path, cube_generation(location))

    def _with_store(self, store: Any) -> "RemoteChunks":
        return type(self)(store, self.reader, self.path, self.generation)

    async def get(self, key: str, prototype: Any, byte_range: ByteRequest | None = None) -> Any:
        metadata = key.rsplit("/", 1)[-1] in _METADATA  # read once per process; never cached
        if byte_range is None:
            start = end = None
        elif isinstance(byte_range, RangeByteRequest):
            start, end = byte_range.start, byte_range.end
        elif isinstance(byte_range, OffsetByteRequest):
            start, end = byte_range.offset, None
        else:  # a suffix (a shard's index): through the fsspec store, which resolves the object's size
            return await self._store.get(key, prototype, byte_range)
        try:
            data = await self.reader.get(f"{self.path}/{key}", start, end, None if metadata else self.generation)
        except FileNotFoundError:
            return None
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Any]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))
