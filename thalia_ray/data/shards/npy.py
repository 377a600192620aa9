"""Our own member format: `{key}.image.npy`, `{key}.mask.npy` (optionally gzipped) and `{key}.json`.

No pickles: arrays are `.npy` with `allow_pickle=False`, the meta is JSON. Decoded members are
views of the fetched bytes, and each distinct `.npy` header is parsed once per process.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import zlib
from typing import Sequence

import numpy as np

from thalia_ray.data import schema
from thalia_ray.data.samples import RawSample
from thalia_ray.data.shards.tar import Blob, ShardError


def _npy_bytes(array: np.ndarray, compress: bool) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def sample_members(raw: RawSample, dtype: str, compress: bool) -> dict[str, bytes]:
    """The members of one sample in our format (suffix → bytes) from a RawSample."""
    if "." in raw.key:
        raise ShardError(f"sample key {raw.key!r} contains a dot; WebDataset keys must not")
    ext = ".npy.gz" if compress else ".npy"
    return {
        f"image{ext}": _npy_bytes(raw.image.astype(dtype), compress),
        f"mask{ext}": _npy_bytes(raw.mask.astype(np.uint8), compress),
        "json": json.dumps(raw.meta, sort_keys=True).encode(),
    }


def member_limit(length: int, channels: int, crop: int) -> int:
    """The most bytes one `.npy` member of a sample can hold in an export of `length` steps, `channels`
    stored channels and `crop`² windows (float32 at most), header included: a member that declares more
    is refused before it is inflated."""
    return _NPY_HEADER_MAX + length * channels * crop * crop * np.dtype(np.float32).itemsize


def _load_npy(members: dict[str, Blob], name: str, where: str, compressed: bool,
              limit: int | None = None) -> np.ndarray:
    """A `.npy` member (`.npy.gz` where the export is `compressed`, as its manifest says) as a
    read-only array viewing the member's bytes; the other form is refused, not guessed. `limit`:
    see `member_limit`."""
    wanted, other = (f"{name}.npy.gz", f"{name}.npy") if compressed else (f"{name}.npy", f"{name}.npy.gz")
    if wanted not in members:
        if other in members:
            raise ShardError(f"{where}: member {other} found, but the manifest says the export is "
                             f"{'' if compressed else 'un'}compressed ({wanted})")
        raise ShardError(f"{where}: member {wanted} is missing (members: {sorted(members)})")
    data = _inflate_npy(members[wanted], wanted, where, limit) if compressed else members[wanted]
    try:
        dtype, shape, fortran, offset = _npy_layout(bytes(data[:_npy_header_end(data)]))
        count = int(np.prod(shape))
        if dtype.hasobject:
            raise ValueError("object arrays need pickling, which this format never uses")
        if len(data) - offset < count * dtype.itemsize:
            raise ValueError(f"{len(data) - offset} data bytes, the header needs {count * dtype.itemsize}")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    except (ValueError, EOFError, OSError, SyntaxError) as err:
        raise ShardError(f"{where}: member {wanted} is corrupt ({err})") from None
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


_NPY_HEADER_MAX = 65_536 + 12  # numpy writes headers of a few hundred bytes; 64 KiB is generous


def _inflate_npy(data: Blob, member: str, where: str, limit: int | None = None) -> bytes:
    """Gunzip a `.npy.gz` member no further than its own header allows: the header is inflated
    first, and the rest only up to the size it declares, so a small member that would inflate to
    gigabytes (a gzip bomb) is refused after at most one byte past that size; a header declaring
    more than `limit` bytes (more than a sample of the export can hold) is refused before that."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        out = inflater.decompress(data, _NPY_HEADER_MAX)
        dtype, shape, _, offset = _npy_layout(bytes(out[:_npy_header_end(out)]))
        size = offset + int(np.prod(shape)) * dtype.itemsize
        if limit is not None and size > limit:
            raise ShardError(f"{where}: member {member} declares {size} bytes, more than a sample of this "
                             f"export holds ({limit}); refused before inflating")
        if len(out) <= size:
            out += inflater.decompress(inflater.unconsumed_tail, size - len(out) + 1)
    except zlib.error as err:
        raise ShardError(f"{where}: member {member} is not valid gzip ({err})") from None
    except (ValueError, SyntaxError) as err:
        raise ShardError(f"{where}: member {member} is corrupt ({err})") from None
    if len(out) > size:
        raise ShardError(f"{where}: member {member} inflates beyond the {size} bytes its .npy header declares")
    if not inflater.eof or inflater.unused_data:
        raise ShardError(f"{where}: member {member} is not valid gzip (truncated stream or trailing data)")
    return out


def _npy_header_end(data: Blob) -> int:
    """Length of the magic string plus header (format versions 1, 2 and 3)."""
    if len(data) < 10 or bytes(data[:6]) != b"\x93NUMPY":
        raise ValueError("not a .npy member (bad magic)")
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if len(data) < 12:
        raise ValueError("header cut short")
    return 12 + int.from_bytes(data[8:12], "little")


@functools.lru_cache(maxsize=1024)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, data offset) from a `.npy` header; members of one export share
    a handful of headers, so the literal parsing is paid once per header and process."""
    fp = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return dtype, tuple(shape), fortran, len(header)


def decode_own(members: dict[str, Blob], key: str, where: str, channels: Sequence[str],
               stored: Sequence[str] = schema.ALL_CHANNELS, compressed: bool = False,
               limit: int | None = None) -> RawSample:
    """Our members of sample `key` → RawSample with the selected `channels`, from the `stored` ones;
    `stored`, `compressed` and `limit` (`member_limit`) follow the manifest. Errors name `where`
    (shard and key)."""
    image = _load_npy(members, "image", where, compressed, limit)
    mask = _load_npy(members, "mask", where, compressed, limit)
    try:
        meta = json.loads(bytes(members["json"]))
    except (KeyError, ValueError) as err:
        raise ShardError(f"{where}: member json is missing or invalid ({err})") from None
    if image.ndim != 4 or image.shape[1] != len(stored) or mask.shape != (image.shape[0], *image.shape[2:]):
        raise ShardError(f"{where}: unexpected shapes image {image.shape}, mask {mask.shape} "
                         f"for {len(stored)} stored channels")
    missing = [c for c in channels if c not in stored]
    if missing:
        raise ShardError(f"{where}: channels {missing} are not in this export (it holds {list(stored)})")
    picked = [list(stored).index(c) for c in channels]
    image = image.astype(np.float32) if picked == list(range(len(stored))) else \
        image[:, picked].astype(np.float32, copy=False)  # either way a fresh, writable array
    return RawSample(image=image, mask=mask.astype(np.uint8), key=key, meta=meta)
