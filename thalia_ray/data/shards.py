"""WebDataset shards: export from minicubes as Ray tasks, and random-access reads of our own and
the published (`torch.save`) format.

Layout written by `export_shards`: `{out}/{T}/{train_pos|train_neg|val|test}/shard-NNNNNN.tar` plus
`{out}/{T}/manifest.json`. Training positives and negatives live in separate directories so balanced
epochs draw from each. Members per sample: `{key}.image.npy` (raw, unnormalised (T, C, h, w): the
configured channels, as the published shards hold them, or all nine with `all_channels` so one
export serves any channel subset; the manifest lists them), `{key}.mask.npy` (uint8 (T, h, w), raw
cube values 0/1/2) and `{key}.json` (the RawSample meta). No pickles. With `compress`, the two
arrays are gzipped (`.npy.gz`); with float16 they take half the bytes.

The stored crop is the deterministic evaluation crop: a shard holds one fixed window per sample, so
its contents must not depend on a random draw made at export time; exports are then reproducible
(same bytes, same sha256) and val/test read from shards equal the cube path exactly. Training from
shards therefore has no random crop offset (geometric augmentations still apply).

The manifest records, for every sample, the byte range of its members inside the tar, its label and
its position in the sample index. Readers fetch exactly the ranges an epoch needs (one ranged GET
per sample, adjacent samples coalesced): a balanced epoch never downloads the unused negatives, and
a read task's memory is bounded by its own samples, whatever the number of shards.

Reading is zero-copy until the final array: ustar headers are parsed directly (anything else, such
as PAX or GNU long-name headers, goes through `tarfile`), `.npy` members become views of the fetched
bytes, and each distinct `.npy` header is parsed once per process.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Sequence, Union

import numpy as np

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.storage import Location, resolve

MANIFEST = "manifest.json"
FORMAT = "thalia-ray-shards/1"
SPLIT_DIRS: dict[str, tuple[str, ...]] = {"train": ("train_pos", "train_neg"), "val": ("val",), "test": ("test",)}
_COALESCE_GAP = 256 * 1024  # fetch neighbouring samples of one shard in one request below this gap
Blob = Union[bytes, memoryview]


class ShardError(ValueError):
    """A shard or member that cannot be used; the message names the shard and the sample key."""


class UnsafeShardError(ShardError):
    """A member needs arbitrary unpickling to load; it is refused, never executed."""


@dataclass(frozen=True)
class ShardEntry:
    """Where one sample lives: its tar, the byte range of its members, its label and index order."""

    key: str
    shard: str  # URL of the tar
    offset: int
    size: int
    label: int
    order: int  # position in the sample index (restores index order for epoch draws)
    fmt: Literal["own", "published"] = "own"

    @property
    def where(self) -> str:
        return f"shard {self.shard}, key {self.key}"


# --------------------------------------------------------------------------------- tar writing
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata, so the same samples always give the same bytes (and sha256)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _npy_bytes(array: np.ndarray, compress: bool) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def sample_members(raw: Any, dtype: str, compress: bool) -> dict[str, bytes]:
    """The members of one sample in our format (suffix → bytes) from a RawSample."""
    if "." in raw.key:
        raise ShardError(f"sample key {raw.key!r} contains a dot; WebDataset keys must not")
    ext = ".npy.gz" if compress else ".npy"
    return {
        f"image{ext}": _npy_bytes(raw.image.astype(dtype), compress),
        f"mask{ext}": _npy_bytes(raw.mask.astype(np.uint8), compress),
        "json": json.dumps(raw.meta, sort_keys=True).encode(),
    }


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


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------- tar reading
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


def fetch_ranges(entries: Sequence[ShardEntry], storage_cfg: Any = None) -> Iterator[tuple[ShardEntry, Blob | Exception]]:
    """Byte ranges of the entries, one request per run of neighbouring samples in the same shard.

    Yields in shard/offset order; a failed request yields its error for each entry it covered, so
    the caller can report every affected sample by shard and key."""
    by_shard: dict[str, list[ShardEntry]] = {}
    for entry in entries:
        by_shard.setdefault(entry.shard, []).append(entry)
    for shard, items in by_shard.items():
        loc = resolve(shard, storage_cfg)
        items.sort(key=lambda e: e.offset)
        run: list[ShardEntry] = []
        for entry in items + [None]:  # type: ignore[list-item]
            if run and (entry is None or entry.offset - (run[-1].offset + run[-1].size) > _COALESCE_GAP):
                yield from _fetch_run(loc, run)
                run = []
            if entry is not None:
                run.append(entry)


def _fetch_run(loc: Location, run: list[ShardEntry]) -> Iterator[tuple[ShardEntry, Blob | Exception]]:
    start, end = run[0].offset, run[-1].offset + run[-1].size
    try:
        data = loc.read_range(start, end)
    except Exception as err:  # noqa: BLE001 - attributed to every sample of the run by the caller
        for item in run:
            yield item, err
        return
    view = memoryview(data)  # one buffer per run; each sample is a view of it
    for item in run:
        chunk = view[item.offset - start:item.offset - start + item.size]
        if len(chunk) < item.size:
            yield item, ShardError(f"{item.where}: shard ends at byte {start + len(data)}, the manifest says {end}")
        else:
            yield item, chunk


# ----------------------------------------------------------------------------------- decoding
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


def decode_own(members: dict[str, Blob], entry: ShardEntry, channels: Sequence[str],
               stored: Sequence[str] = schema.ALL_CHANNELS) -> Any:
    """Our members → RawSample with the selected `channels`, from the `stored` ones (the manifest's)."""
    from thalia_ray.data.cube import RawSample

    image = _load_npy(members, "image", entry.where)
    mask = _load_npy(members, "mask", entry.where)
    try:
        meta = json.loads(bytes(members["json"]))
    except (KeyError, ValueError) as err:
        raise ShardError(f"{entry.where}: member json is missing or invalid ({err})") from None
    if image.ndim != 4 or image.shape[1] != len(stored) or mask.shape != (image.shape[0], *image.shape[2:]):
        raise ShardError(f"{entry.where}: unexpected shapes image {image.shape}, mask {mask.shape} "
                         f"for {len(stored)} stored channels")
    missing = [c for c in channels if c not in stored]
    if missing:
        raise ShardError(f"{entry.where}: channels {missing} are not in this export (it holds {list(stored)})")
    picked = [list(stored).index(c) for c in channels]
    image = image.astype(np.float32) if picked == list(range(len(stored))) else \
        image[:, picked].astype(np.float32, copy=False)  # either way a fresh, writable array
    return RawSample(image=image, mask=mask.astype(np.uint8), key=entry.key, meta=meta)


def safe_torch_load(data: Blob, where: str) -> Any:
    """`torch.load` restricted to tensors and plain values; anything needing arbitrary unpickling
    (a `__reduce__` payload, custom classes) is refused before it can execute."""
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeShardError(
            f"{where}: refused: the member needs arbitrary unpickling, which could run code ({first_line})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise ShardError(f"{where}: corrupt torch.save member ({err})") from None


def published_channels(n_stacked: int, length: int, wanted: Sequence[str], where: str) -> list[str]:
    """Channel layout of a published image (T*C, H, W): all nine, the configured set, or the
    geomorphology channels (the layouts the original exporter produces)."""
    if n_stacked % length:
        raise ShardError(f"{where}: {n_stacked} stacked channels do not divide by T={length}")
    count = n_stacked // length
    for layout in (list(schema.ALL_CHANNELS), list(wanted), list(schema.GEOMORPHOLOGY)):
        if len(layout) == count:
            return layout
    raise ShardError(f"{where}: {count} channels per step match no known layout; configured {list(wanted)}")


def _published_meta_sample(info: dict[str, Any], key: str, label_rule: str, split: str, where: str) -> Any:
    """The `sample.pth` dict (frame_id, annotation list, per-member labels) → (Sample, annotations)."""
    from thalia_ray.data.annotations import AnnotationError, parse_annotation
    from thalia_ray.data.index import Sample, series_label

    try:
        records = [parse_annotation(raw.get("uniqueID"), raw) for raw in info["annotation"]]
    except (KeyError, TypeError, AttributeError, AnnotationError) as err:
        raise ShardError(f"{where}: sample.pth does not hold valid annotations ({err})") from None
    if not records:
        raise ShardError(f"{where}: sample.pth lists no annotations")
    positive = tuple(r.positive for r in records)
    sample = Sample(
        key=key,
        frame_id=records[0].frame_id,
        primary_date=records[0].primary_date,
        secondary_dates=tuple(r.secondary_date for r in records),
        unique_ids=tuple(r.unique_id for r in records),
        member_positive=positive,
        label=series_label(positive, label_rule),
        split=split,
    )
    return sample, {r.unique_id: r for r in records}


def decode_published(members: dict[str, bytes], entry: ShardEntry, data_cfg: DataConfig, split: str) -> Any:
    """Published `image.pth` (T*C, H, W), `labels.pth` (T, H, W) and `sample.pth` → RawSample."""
    from thalia_ray.data.cube import RawSample, Window, sample_meta

    missing = [m for m in ("image.pth", "labels.pth", "sample.pth") if m not in members]
    if missing:
        raise ShardError(f"{entry.where}: member(s) {missing} missing (members: {sorted(members)})")
    image = safe_torch_load(members["image.pth"], f"{entry.where}, member image.pth")
    mask = safe_torch_load(members["labels.pth"], f"{entry.where}, member labels.pth")
    info = safe_torch_load(members["sample.pth"], f"{entry.where}, member sample.pth")
    if not isinstance(info, dict):
        raise ShardError(f"{entry.where}: sample.pth holds {type(info).__name__}, expected a dict")
    image, mask = np.asarray(image, dtype=np.float32), np.asarray(mask)
    if image.ndim != 3:
        raise ShardError(f"{entry.where}: image.pth has shape {image.shape}, expected (T*C, H, W)")
    length = data_cfg.length
    layout = published_channels(image.shape[0], length, data_cfg.channels, entry.where)
    absent = [c for c in data_cfg.channels if c not in layout]
    if absent:
        raise ShardError(f"{entry.where}: channels {absent} are not in this shard (it has {layout})")
    image = image.reshape(length, len(layout), *image.shape[1:])[:, [layout.index(c) for c in data_cfg.channels]]
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.shape != (length, *image.shape[2:]):
        raise ShardError(f"{entry.where}: labels.pth has shape {mask.shape}, expected {(length, *image.shape[2:])}")
    sample, annotations = _published_meta_sample(info, entry.key, data_cfg.label_rule, split, entry.where)
    # The crop position inside the frame is not recorded in published shards: the window is the whole stored crop.
    window = Window(0, 0, image.shape[-2], image.shape[-1])
    return RawSample(image=image, mask=mask.astype(np.uint8), key=entry.key, meta=sample_meta(sample, annotations, window))


def published_members(raw: Any, records: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """One sample in the published member layout, as the original exporter writes it: image
    (T*C, H, W) float32 of the sample's channels, labels (T, H, W) int64 with earthquake 2 → 1, and
    the pickled sample dict (frame_id, the raw annotation records, per-member labels). For
    interoperability and as the shard benchmark's baseline; our own exports never pickle."""
    import torch

    def saved(obj: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    image = torch.from_numpy(np.ascontiguousarray(raw.image, dtype=np.float32).reshape(-1, *raw.image.shape[2:]))
    labels = torch.from_numpy(np.where(raw.mask == 2, 1, raw.mask).astype(np.int64))
    info = {"frame_id": raw.meta["frame_id"], "annotation": list(records),
            "label": list(raw.meta["member_positive"]),
            "annotation_path": [f"annotations/{r['uniqueID']}.json" for r in records]}
    return {"image.pth": saved(image), "labels.pth": saved(labels), "sample.pth": saved(info)}


# ---------------------------------------------------------------------------------- catalogues
def shard_root(root: str | Location, length: int, storage_cfg: Any = None) -> Location:
    return resolve(root, storage_cfg).join(str(length))


def load_manifest(root: str | Location, length: int, storage_cfg: Any = None) -> dict[str, Any]:
    loc = shard_root(root, length, storage_cfg).join(MANIFEST)
    if not loc.exists():
        raise ShardError(f"{loc.url}: no shard manifest; run `export` for T={length} first")
    manifest = loc.read_json()
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{loc.url}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def manifest_entries(manifest: dict[str, Any], base: Location, split: str) -> list[ShardEntry]:
    """The split's samples from a manifest, in sample-index order."""
    entries = [
        ShardEntry(key, base.join(shard["name"]).url, offset, size, label, order)
        for shard in manifest["shards"]
        if shard["split"] == split
        for key, offset, size, label, order in shard["entries"]
    ]
    return sorted(entries, key=lambda e: e.order)


def _scan_published_shard(url: str, label_rule: str, storage_cfg: Any) -> list[tuple[str, int, int, int]]:
    """(key, offset, size, label) of every sample of one published tar (labels from sample.pth)."""
    from thalia_ray.data.index import series_label

    loc = resolve(url, storage_cfg)
    data = loc.read_bytes()
    spans: dict[str, list[int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, suffix = split_name(info.name)
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                span = spans.setdefault(key, [info.offset, end])
                span[0], span[1] = min(span[0], info.offset), max(span[1], end)
                if suffix == "sample.pth":
                    where = f"shard {url}, key {key}, member sample.pth"
                    sample = safe_torch_load(data[info.offset_data:info.offset_data + info.size], where)
                    member_labels = sample.get("label") if isinstance(sample, dict) else None
                    if not isinstance(member_labels, (list, tuple)) or not member_labels:
                        raise ShardError(f"{where}: no per-member 'label' list")
                    labels[key] = series_label([bool(v) for v in member_labels], label_rule)
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"shard {url}: corrupt tar ({err})") from None
    unlabelled = sorted(set(spans) - set(labels))
    if unlabelled:
        raise ShardError(f"shard {url}: keys {unlabelled[:5]} have no sample.pth")
    return [(key, start, end - start, labels[key]) for key, (start, end) in spans.items()]


def published_shards(root: str | Location, length: int, split: str, storage_cfg: Any = None) -> list[Location]:
    """Tars of a published split: `{root}/{T}/{split}/*.tar`, else `{root}/{split}/*.tar`."""
    base = resolve(root, storage_cfg)
    for folder in (base.join(str(length), split), base.join(split)):
        tars = [t for t in folder.glob("*.tar")] if folder.exists() else []
        if tars:
            return tars
    raise ShardError(f"{base.url}: no published shards for split {split!r} (looked in {length}/{split}/ and {split}/)")


def scan_published(root: str | Location, length: int, split: str, label_rule: str,
                   storage_cfg: Any = None, num_cpus: float = 0.25) -> list[ShardEntry]:
    """Index the published shards of a split (one Ray task per tar), in shard/key order."""
    import ray

    scan = ray.remote(_scan_published_shard).options(num_cpus=num_cpus)
    urls = [t.url for t in published_shards(root, length, split, storage_cfg)]
    found = ray.get([scan.remote(url, label_rule, storage_cfg) for url in urls])
    rows = [(url, row) for url, rows in zip(urls, found) for row in rows]
    return [ShardEntry(key, url, off, size, label, i, "published") for i, (url, (key, off, size, label)) in enumerate(rows)]


# -------------------------------------------------------------------------------------- export
@dataclass(frozen=True)
class ShardPlan:
    name: str  # relative to {out}/{T}: e.g. "train_pos/shard-000000.tar"
    split: str
    items: tuple[tuple[int, Any], ...]  # (index order, Sample)

    @property
    def keys(self) -> list[str]:
        return [s.key for _, s in self.items]


@dataclass
class ExportReport:
    root: str
    length: int
    shards_written: int = 0
    shards_kept: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # per shard directory
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # samples that could not be read, with the reason
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_shards(index: Any, splits: Sequence[str], samples_per_shard: int) -> list[ShardPlan]:
    """Deterministic assignment of samples to shards: index order, train split by label."""
    plans = []
    for split in splits:
        ordered = list(enumerate(index.samples(split)))
        groups = {split: ordered}
        if split == "train":
            groups = {"train_pos": [x for x in ordered if x[1].label == 1],
                      "train_neg": [x for x in ordered if x[1].label != 1]}
        for folder, items in groups.items():
            for n, start in enumerate(range(0, len(items), samples_per_shard)):
                chunk = tuple(items[start:start + samples_per_shard])
                plans.append(ShardPlan(f"{folder}/shard-{n:06d}.tar", split, chunk))
    return plans


def _done_marker(base: Location, plan: ShardPlan) -> Location:
    return base.join(f"{plan.name}.done")


def _completed(base: Location, plan: ShardPlan, layout: MemberLayout) -> dict[str, Any] | None:
    """The done record of a shard that is complete, holds the planned samples and was written with
    this layout (channels, dtype, compression), else None."""
    marker = _done_marker(base, plan)
    if not marker.exists():
        return None
    record = marker.read_json()
    if record.get("layout") != json.loads(json.dumps(asdict(layout))):
        return None
    tar = base.join(plan.name)
    planned = [k for k in plan.keys if k not in record.get("skipped_keys", [])]
    if [e[0] for e in record.get("entries", [])] != planned or not tar.exists() or tar.size() != record.get("bytes"):
        return None
    return record


def eval_raw(sample: Any, annotations: Any, data_cfg: DataConfig, storage_cfg: Any = None,
             channels: Sequence[str] = schema.ALL_CHANNELS) -> Any:
    """The sample as stored in a shard: evaluation crop, the `channels` to store, raw values."""
    from thalia_ray.data.cube import crop_window, get_cache, read_raw

    cache = get_cache(data_cfg.root, storage_cfg)
    window = crop_window(sample, annotations, cache.get(sample.frame_id).shape, data_cfg.crop, None,
                         data_cfg.mask_target)
    return read_raw(sample, cache, window, list(channels), annotations)


@dataclass(frozen=True)
class MemberLayout:
    """How an export stores samples; a shard written with another layout is not reused on resume."""

    channels: tuple[str, ...]
    dtype: Literal["float32", "float16"] = "float32"
    compress: bool = False


def _write_shard(plan: ShardPlan, annotations: dict[int, Any], data_cfg: DataConfig, base_url: str,
                 layout: MemberLayout, storage_cfg: Any) -> dict[str, Any]:
    """Ray task: read the plan's samples (evaluation crop, the layout's channels), write the tar to a
    temp name, move it into place, then write the `.done` record (the manifest entry of this shard)."""
    base = resolve(base_url, storage_cfg)
    members, skipped, keys_skipped = [], [], []
    for _, sample in plan.items:
        try:
            raw = eval_raw(sample, annotations, data_cfg, storage_cfg, layout.channels)
        except Exception as err:  # noqa: BLE001 - any unreadable sample is reported, never dropped silently
            if data_cfg.on_bad_sample == "fail":
                raise ShardError(f"cube {sample.frame_id}, key {sample.key}: unreadable ({err})") from err
            skipped.append(f"cube {sample.frame_id}, key {sample.key}: {type(err).__name__}: {err}")
            keys_skipped.append(sample.key)
            continue
        members.append((sample.key, sample_members(raw, layout.dtype, layout.compress)))
    target = base.join(plan.name)
    local_dir = os.path.dirname(target.path) if target.protocol == "file" else None
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tar.tmp", dir=local_dir)
    os.close(fd)
    try:
        ranges = write_tar(tmp, members)
        size, digest = os.path.getsize(tmp), file_sha256(tmp)
        if target.protocol == "file":
            os.replace(tmp, target.path)
        else:
            target.put_file(tmp)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    orders = {s.key: order for order, s in plan.items}
    labels = {s.key: s.label for _, s in plan.items}
    record = {
        "name": plan.name, "split": plan.split, "samples": len(ranges), "bytes": size, "sha256": digest,
        "entries": [[k, off, n, labels[k], orders[k]] for k, off, n in ranges],
        "skipped": skipped, "skipped_keys": keys_skipped, "layout": asdict(layout),
    }
    _done_marker(base, plan).write_json(record, indent=None)
    return record


def export_shards(
    data_cfg: DataConfig,
    out: str,
    length: int,
    splits: Sequence[str] = ("train", "val", "test"),
    samples_per_shard: int = 64,
    dtype: Literal["float32", "float16"] = "float32",
    compress: bool = False,
    all_channels: bool = False,
    seed: int = 0,
    storage_cfg: Any = None,
    max_in_flight: int = 8,
    num_cpus: float = 0.5,
) -> ExportReport:
    """Export the dataset under `data_cfg.root` for series length `length` as WebDataset shards,
    one Ray task per shard. Samples hold the configured channels (as published shards do), or all
    nine with `all_channels`, so that one export serves any channel subset. Complete shards of an
    earlier run (done record + tar of the recorded size, same planned samples, same layout) are
    kept; the manifest is written atomically at the end."""
    import ray

    from thalia_ray.data.index import SampleIndex

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype {dtype!r}: allowed float32, float16")
    started = time.perf_counter()
    cfg = DataConfig.model_validate({**data_cfg.model_dump(), "length": length})
    index = SampleIndex.from_config(cfg, seed)
    layout = MemberLayout(tuple(schema.ALL_CHANNELS if all_channels else cfg.channels), dtype, compress)
    base = shard_root(out, length, storage_cfg)
    report = ExportReport(root=base.url, length=length)
    records: dict[str, dict[str, Any]] = {}
    pending = []
    task = ray.remote(_write_shard).options(num_cpus=num_cpus)
    for plan in plan_shards(index, splits, samples_per_shard):
        done = _completed(base, plan, layout)
        if done is not None:
            records[plan.name] = done
            report.shards_kept += 1
            continue
        if len(pending) >= max_in_flight:  # bounded: never more than max_in_flight shards in memory
            ready, pending = ray.wait(pending, num_returns=1)
            for record in ray.get(ready):
                records[record["name"]] = record
        uids = {u for _, s in plan.items for u in s.unique_ids}
        subset = {u: index.annotations[u] for u in uids}
        pending.append(task.remote(plan, subset, cfg, base.url, layout, storage_cfg))
        report.shards_written += 1
    for record in ray.get(pending):
        records[record["name"]] = record
    shards = [records[name] for name in sorted(records)]
    for shard in shards:
        folder = shard["name"].split("/", 1)[0]
        report.samples[folder] = report.samples.get(folder, 0) + shard["samples"]
        report.bytes += shard["bytes"]
        report.skipped.extend(shard["skipped"])
    manifest = {
        "format": FORMAT, "length": length, "channels": list(layout.channels), "dtype": dtype,
        "compress": compress, "crop": cfg.crop, "mask_target": cfg.mask_target, "policy": cfg.policy, "label_rule": cfg.label_rule,
        "seed": seed, "splits": list(splits),
        "shards": [{k: v for k, v in s.items() if k not in ("skipped_keys", "layout")} for s in shards],
    }
    base.join(MANIFEST).write_json(manifest, indent=None)
    report.seconds = time.perf_counter() - started
    return report
