"""The published Thalia shards (`torch.save` members): safe loading, decoding, listing and writing.

Layout: `{root}/{T}/train_pos/`, `{T}/train_neg/`, `{T}/val/`, `{T}/test/` (or the folders directly
under the root given), tars `sample-{folder}-NNNNNN.tar` (any `*.tar` is read, so the exporter's
`sample-{folder}-{writer}-NNNNNN.tar` names work too), keys `sampleNNNNNN` (the sample's position in
its split, which restores the split's order whatever the number of writers). Members per sample: `image.pth` (T*C, H, W) float32, `labels.pth` (T, H, W) int64 and `sample.pth`
(a dict: frame_id, the raw annotation records, per-member labels, annotation paths). They are
pickles, so every load is `torch.load(weights_only=True)`: anything needing arbitrary unpickling
is refused before it can run.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from typing import Any, Sequence

import numpy as np

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationError, parse_annotation
from thalia_ray.data.cube import sample_meta
from thalia_ray.data.index import series_label
from thalia_ray.data.samples import RawSample, Sample, Window
from thalia_ray.data.shards.tar import Blob, ShardEntry, ShardError, UnsafeShardError, split_name
from thalia_ray.storage import Location

TRAIN_FOLDERS = ("train_pos", "train_neg")
FOLDERS: dict[str, tuple[str, ...]] = {"train": TRAIN_FOLDERS, "val": ("val",), "test": ("test",)}


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


def _published_meta_sample(info: dict[str, Any], key: str, label_rule: str, split: str,
                           where: str) -> tuple[Sample, dict[int, Any]]:
    """The `sample.pth` dict (frame_id, annotation list, per-member labels) → (Sample, annotations)."""
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


def decode_published(members: dict[str, Blob], key: str, where: str, data_cfg: DataConfig,
                     split: str) -> RawSample:
    """Published `image.pth` (T*C, H, W), `labels.pth` (T, H, W) and `sample.pth` of sample `key` →
    RawSample; errors name `where` (shard and key)."""
    missing = [m for m in ("image.pth", "labels.pth", "sample.pth") if m not in members]
    if missing:
        raise ShardError(f"{where}: member(s) {missing} missing (members: {sorted(members)})")
    image = safe_torch_load(members["image.pth"], f"{where}, member image.pth")
    mask = safe_torch_load(members["labels.pth"], f"{where}, member labels.pth")
    info = safe_torch_load(members["sample.pth"], f"{where}, member sample.pth")
    if not isinstance(info, dict):
        raise ShardError(f"{where}: sample.pth holds {type(info).__name__}, expected a dict")
    image, mask = np.asarray(image, dtype=np.float32), np.asarray(mask)
    if image.ndim != 3:
        raise ShardError(f"{where}: image.pth has shape {image.shape}, expected (T*C, H, W)")
    length = data_cfg.length
    layout = published_channels(image.shape[0], length, data_cfg.channels, where)
    absent = [c for c in data_cfg.channels if c not in layout]
    if absent:
        raise ShardError(f"{where}: channels {absent} are not in this shard (it has {layout})")
    image = image.reshape(length, len(layout), *image.shape[1:])[:, [layout.index(c) for c in data_cfg.channels]]
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.shape != (length, *image.shape[2:]):
        raise ShardError(f"{where}: labels.pth has shape {mask.shape}, expected {(length, *image.shape[2:])}")
    sample, annotations = _published_meta_sample(info, key, data_cfg.label_rule_for(split), split, where)
    # The crop position inside the frame is not recorded in published shards: the window is the whole stored crop.
    window = Window(0, 0, image.shape[-2], image.shape[-1])
    return RawSample(image=image, mask=mask.astype(np.uint8), key=key, meta=sample_meta(sample, annotations, window))


def published_members(raw: RawSample, records: Sequence[dict[str, Any]]) -> dict[str, bytes]:
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


def _scan_published_shard(loc: Location, folder: str, label_rule: str) -> list[tuple[str, int, int, int]]:
    """(key, offset, size, label) of every sample of one published tar (labels from sample.pth).
    In `train_pos`/`train_neg` a sample's members must be (not) any positive, as the exporter sorts them."""
    url = loc.url
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
                    positive = [bool(v) for v in member_labels]
                    if folder in TRAIN_FOLDERS and any(positive) != (folder == TRAIN_FOLDERS[0]):
                        raise ShardError(f"{where}: member labels {positive} do not belong in {folder}/")
                    labels[key] = series_label(positive, label_rule)
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"shard {url}: corrupt tar ({err})") from None
    unlabelled = sorted(set(spans) - set(labels))
    if unlabelled:
        raise ShardError(f"shard {url}: keys {unlabelled[:5]} have no sample.pth")
    return [(key, start, end - start, labels[key]) for key, (start, end) in spans.items()]


def published_shards(base: Location, length: int, folder: str) -> list[Location]:
    """Tars of a published folder: `{root}/{T}/{folder}/*.tar`, else `{root}/{folder}/*.tar`."""
    for place in (base.join(str(length), folder), base.join(folder)):
        tars = place.glob("*.tar") if place.exists() else []
        if tars:
            return tars
    raise ShardError(f"{base.url}: no published shards in {folder!r} (looked in {length}/{folder}/ and {folder}/)")


def scan_published(root: Location, length: int, split: str, label_rule: str,
                   num_cpus: float = 0.25) -> list[ShardEntry]:
    """Index the published shards of a split (one Ray task per tar), in key order (the split's
    order); train gathers `train_pos` and `train_neg`."""
    import ray

    scan = ray.remote(_scan_published_shard).options(num_cpus=num_cpus)
    tars = [(folder, tar) for folder in FOLDERS.get(split, (split,)) for tar in published_shards(root, length, folder)]
    found = ray.get([scan.remote(tar, folder, label_rule) for folder, tar in tars])
    rows = sorted(((key, tar, off, size, label) for (_, tar), rows in zip(tars, found) for key, off, size, label in rows),
                  key=lambda row: row[0])
    for (key, first, *_), (other, second, *_) in zip(rows, rows[1:]):
        if key == other:
            raise ShardError(f"key {key} is in both shard {first.url} and shard {second.url}")
    return [ShardEntry(key, tar, off, size, label, i) for i, (key, tar, off, size, label) in enumerate(rows)]
