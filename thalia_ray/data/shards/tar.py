"""The tar container of WebDataset shards: where a sample lives, deterministic writing, zero-copy
member parsing and ranged fetches.

Reading is zero-copy until the final array: ustar headers are parsed directly (anything else, such
as PAX or GNU long-name headers, goes through `tarfile`). Readers fetch exactly the byte ranges an
epoch needs (one ranged GET per run of neighbouring samples of one shard), so a read task's memory
is bounded by its own samples, whatever the number of shards.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, Union

from thalia_ray.errors import ShardProblem
from thalia_ray.storage import Location, local


_COALESCE_GAP = 256 * 1024  # fetch neighbouring samples of one shard in one request below this gap
# From object storage a request costs a round trip (tens of ms, in which a bucket sends MBs) and a
# fee: neighbours up to this far apart are fetched in one ranged GET, the runs of a shard concurrently.
_OBJECT_STORE_GAP = 4 * 2**20
_WHOLE_SHARD_LIMIT = 256 * 2**20  # a shard verified from object storage in one GET (held in memory once)
Blob = Union[bytes, memoryview]


class ShardError(ShardProblem):
    """A shard or member that cannot be used; the message names the shard and the sample key."""


class UnsafeShardError(ShardError):
    """A member needs arbitrary unpickling to load; it is refused, never executed."""


@dataclass(frozen=True)
class ShardEntry:
    """Where one sample lives: its tar, the byte range of its members, its label and index order."""

    key: str
    shard: Location  # the tar, with its storage options
    offset: int
    size: int
    label: int
    order: int  # position in the sample index (restores index order for epoch draws)
    sha256: str | None = None  # the whole shard's, from the manifest (published shards have none)

    @property
    def where(self) -> str:
        return f"shard {self.shard.url}, key {self.key}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata, so the same samples always give the same bytes (and sha256)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: str, samples: Sequence[tuple[str, dict[str, bytes]]]) -> list[tuple[str, int, int]]:
    """Write (key, members) to a tar at `path`; returns (key, offset, size) byte ranges per sample."""
    ranges = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            start = tar.offset
            for suffix, data in members.items():
                tar.addfile(_tarinfo(f"{key}.{suffix}", len(data)), io.BytesIO(data))
            ranges.append((key, start, tar.offset - start))
    return ranges


def file_sha256(path: str | Location) -> str:
    """sha256 of a file (local or remote), streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with local(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFIED: set[tuple[Location, str]] = set()  # shards whose bytes matched their digest in this process
_VERIFIED_LOCK = threading.Lock()


def verify_shard(loc: Location, sha256: str) -> None:
    """Raise ShardError unless the shard hashes to `sha256`. Checked once per shard and process:
    readers fetch byte ranges, so without this a shard changed after export would decode to
    whatever its bytes now hold. From object storage a shard up to `_WHOLE_SHARD_LIMIT` is one counted,
    retried GET, kept in the node-local cache under its digest when that is on (so a node downloads it
    once); a larger one is streamed through the hash as locally."""
    with _VERIFIED_LOCK:
        if (loc, sha256) in _VERIFIED:
            return
    whole = loc.protocol == "s3" and loc.size() <= _WHOLE_SHARD_LIMIT
    actual = _remote_sha256(loc, sha256) if whole else file_sha256(loc)
    if actual != sha256:
        raise ShardError(f"shard {loc.url}: sha256 {actual[:16]}… does not match the manifest's {sha256[:16]}…; "
                         "the shard changed after export (export again to rewrite it)")
    with _VERIFIED_LOCK:
        _VERIFIED.add((loc, sha256))


def _remote_sha256(loc: Location, sha256: str) -> str:
    from zarr.core.sync import sync

    from thalia_ray.object_reads import object_reader

    async def whole() -> Any:
        return await object_reader(loc.s3).get(loc.path, generation=sha256)

    return hashlib.sha256(sync(whole())).hexdigest()


def split_name(name: str) -> tuple[str, str]:
    """`dir/key.image.npy` → (`key`, `image.npy`): the WebDataset rule (key ends at the first dot)."""
    base = name.rsplit("/", 1)[-1]
    key, _, suffix = base.partition(".")
    return key, suffix


def parse_members(chunk: Blob, where: str) -> dict[str, dict[str, Blob]]:
    """Tar bytes (whole shard or a byte range of whole members) → {key: {suffix: member bytes}}.

    Plain ustar members (what `write_tar` and most writers produce) are sliced out without copying;
    any other header kind, or a header that fails its checksum, is handed to `tarfile`, which also
    words the error for corrupt data."""
    grouped: dict[str, dict[str, Blob]] = {}
    members = _ustar_members(memoryview(chunk), where)
    if members is None:
        members = _tarfile_members(chunk, where)
    for name, data in members:
        key, suffix = split_name(name)
        grouped.setdefault(key, {})[suffix] = data
    return grouped


_BLOCK = tarfile.BLOCKSIZE
_REGULAR = (ord("0"), 0)  # typeflags of a regular file in ustar (and the old "\0" spelling)


def _ustar_members(view: memoryview, where: str) -> list[tuple[str, memoryview]] | None:
    """(name, data view) of every regular member, or None where a header is not plain ustar."""
    found, pos = [], 0
    while pos + _BLOCK <= len(view):
        header = view[pos:pos + _BLOCK]
        if not any(header):  # end-of-archive block
            break
        if header[156] not in _REGULAR or header[124] & 0x80:  # other kinds, base-256 sizes
            return None
        try:
            size = int(bytes(header[124:136]).strip(b"\0 ") or b"0", 8)
            checksum = int(bytes(header[148:156]).strip(b"\0 "), 8)
        except ValueError:
            return None
        if sum(header) - sum(header[148:156]) + 8 * 32 != checksum:
            return None
        name = bytes(header[:100]).split(b"\0", 1)[0].decode("utf-8", "replace")
        if bytes(header[257:262]) == b"ustar" and header[345]:
            name = bytes(header[345:500]).split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        start = pos + _BLOCK
        if start + size > len(view):
            raise ShardError(f"{where}: member {name} is truncated ({max(len(view) - start, 0)} of {size} bytes)")
        found.append((name, view[start:start + size]))
        pos = start + -(-size // _BLOCK) * _BLOCK
    return found


def _tarfile_members(chunk: Blob, where: str) -> list[tuple[str, bytes]]:
    found = []
    try:
        with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise ShardError(f"{where}: member {info.name} is truncated ({len(data)} of {info.size} bytes)")
                found.append((info.name, data))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{where}: corrupt tar data ({err})") from None
    return found


def fetch_ranges(entries: Sequence[ShardEntry]) -> Iterator[tuple[ShardEntry, Blob | Exception]]:
    """Byte ranges of the entries, one request per run of neighbouring samples in the same shard,
    each shard verified against its digest first (see verify_shard).

    Yields in shard/offset order; a failed request or check yields its error for each entry it
    covered, so the caller can report every affected sample by shard and key. From object storage the
    runs are cut with a larger gap and fetched at once through `object_reads` (counted, retried, cached
    on the node under the shard's digest)."""
    by_shard: dict[Location, list[ShardEntry]] = {}
    for entry in entries:
        by_shard.setdefault(entry.shard, []).append(entry)
    remote: list[tuple[Location, list[ShardEntry]]] = []
    for loc, items in by_shard.items():
        items.sort(key=lambda e: e.offset)
        if items[0].sha256:
            try:
                verify_shard(loc, items[0].sha256)
            except Exception as err:  # noqa: BLE001 - attributed to every sample of the shard by the caller
                yield from ((item, err) for item in items)
                continue
        if loc.protocol == "s3":
            remote += [(loc, run) for run in coalesce(items, _OBJECT_STORE_GAP)]
        else:
            for run in coalesce(items, _COALESCE_GAP):
                yield from _split_run(run, _read(loc, run))
    if remote:
        yield from _fetch_remote(remote)


def coalesce(items: Sequence[ShardEntry], gap: int) -> list[list[ShardEntry]]:
    """Entries of one shard (sorted by offset) in runs whose neighbours are at most `gap` bytes apart."""
    runs: list[list[ShardEntry]] = []
    for entry in items:
        if runs and entry.offset - (runs[-1][-1].offset + runs[-1][-1].size) <= gap:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _read(loc: Location, run: list[ShardEntry]) -> bytes | Exception:
    try:
        return loc.read_range(run[0].offset, run[-1].offset + run[-1].size)
    except Exception as err:  # noqa: BLE001 - attributed to every sample of the run by the caller
        return err


def _fetch_remote(runs: list[tuple[Location, list[ShardEntry]]]) -> Iterator[tuple[ShardEntry, Blob | Exception]]:
    """Every run of every shard at once (ranged GETs through object_reads, cached under the shard's digest)."""
    import asyncio

    from zarr.core.sync import sync

    from thalia_ray.object_reads import object_reader

    async def every_run() -> list[Any]:
        return await asyncio.gather(*(
            object_reader(loc.s3).get(loc.path, run[0].offset, run[-1].offset + run[-1].size, run[0].sha256 or "")
            for loc, run in runs), return_exceptions=True)

    for (_, run), data in zip(runs, sync(every_run())):
        yield from _split_run(run, data)


def _split_run(run: list[ShardEntry], data: Blob | BaseException) -> Iterator[tuple[ShardEntry, Blob | Exception]]:
    if isinstance(data, BaseException):
        for item in run:
            yield item, data if isinstance(data, Exception) else RuntimeError(str(data))
        return
    start, end = run[0].offset, run[-1].offset + run[-1].size
    view = memoryview(data)  # one buffer per run; each sample is a view of it
    for item in run:
        chunk = view[item.offset - start:item.offset - start + item.size]
        if len(chunk) < item.size:
            yield item, ShardError(f"{item.where}: shard ends at byte {start + len(data)}, the manifest says {end}")
        else:
            yield item, chunk
