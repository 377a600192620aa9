"""Our own member format: `{key}.image.npy`, `{key}.mask.npy` (optionally gzipped) and `{key}.json`.

No pickles: arrays are `.npy` with `allow_pickle=False`, the meta is JSON. Decoded members are
views of the fetched bytes, and each distinct `.npy` header is parsed once per process.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
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


def _load_npy(members: dict[str, Blob], name: str, where: str) -> np.ndarray:
    """A `.npy` (or `.npy.gz`) member as a read-only array viewing the member's bytes."""
    if f"{name}.npy" in members:
        data = members[f"{name}.npy"]
    elif f"{name}.npy.gz" in members:
        try:
            data = gzip.decompress(members[f"{name}.npy.gz"])
        except (OSError, EOFError) as err:
            raise ShardError(f"{where}: member {name}.npy.gz is not valid gzip ({err})") from None
    else:
        raise ShardError(f"{where}: member {name}.npy is missing (members: {sorted(members)})")
    try:
        dtype, shape, fortran, offset = _npy_layout(bytes(data[:_npy_header_end(data)]))
        count = int(np.prod(shape))
        if dtype.hasobject:
            raise ValueError("object arrays need pickling, which this format never uses")
        if len(data) - offset < count * dtype.itemsize:
            raise ValueError(f"{len(data) - offset} data bytes, the header needs {count * dtype.itemsize}")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    except (ValueError, EOFError, OSError, SyntaxError) as err:
        raise ShardError(f"{where}: member {name}.npy is corrupt ({err})") from None
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


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
               stored: Sequence[str] = schema.ALL_CHANNELS) -> RawSample:
    """Our members of sample `key` → RawSample with the selected `channels`, from the `stored` ones
    (the manifest's); errors name `where` (shard and key)."""
    image = _load_npy(members, "image", where)
    mask = _load_npy(members, "mask", where)
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
