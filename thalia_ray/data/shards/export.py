"""Export from minicubes to WebDataset shards, one Ray task per shard, resumable.

Layout: `{out}/{T}/{train_pos|train_neg|val|test}/shard-NNNNNN.tar` plus `{out}/{T}/manifest.json`.
Training positives and negatives live in separate directories so balanced epochs draw from each.
The split folders hold nothing but tars, so standard WebDataset readers (`webdataset.WebDataset`,
`ray.data.read_webdataset`) take them as they are: the per-shard completion records that make an
export resumable live beside them, in `{out}/{T}/_progress/`.
Members per sample: see `npy` (raw, unnormalised (T, C, h, w) of the configured channels, as the
published shards hold them, or all nine with `all_channels` so one export serves any channel subset;
the manifest lists them). With `compress`, the two arrays are gzipped; float16 halves them.

The stored crop is the deterministic evaluation crop: a shard holds one fixed window per sample, so
its contents must not depend on a random draw made at export time; exports are then reproducible
(same bytes, same sha256) and val/test read from shards equal the cube path exactly. Training from
shards therefore has no random crop offset (geometric augmentations still apply).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

from thalia_ray import interrupts
from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import crop_rng, get_cache, read_sample
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.shards.manifest import FORMAT, MANIFEST, shard_root

PROGRESS = "_progress"  # completion records of written shards, beside (not inside) the split folders
from thalia_ray.data.shards.npy import sample_members
from thalia_ray.data.shards.tar import ShardError, file_sha256, write_tar
from thalia_ray.storage import Location, local, writing_to


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
    left_out: list[str] = field(default_factory=list)  # annotations and series members the index left out, and why
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


@dataclass(frozen=True)
class MemberLayout:
    """How an export crops and stores samples; a shard written with another layout is not reused on resume."""

    channels: tuple[str, ...]
    dtype: Literal["float32", "float16"] = "float32"
    compress: bool = False
    crop_policy: Literal["centred", "reference"] = "centred"
    crop_seed: int | None = None  # the seed of the reference policy's crops (centred crops need none)


def _done_marker(base: Location, plan: ShardPlan) -> Location:
    """The completion record of a shard, outside the split folders: `_progress/{name}.json`."""
    return base.join(PROGRESS, f"{plan.name}.json")


def _completed(base: Location, plan: ShardPlan, layout: MemberLayout) -> dict[str, Any] | None:
    """The completion record of a shard that is complete, holds the planned samples, was written
    with this layout (channels, dtype, compression) and still has its recorded sha256, else None."""
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
    if file_sha256(tar) != record.get("sha256"):  # changed since it was written: write it again
        return None
    return record


def _write_shard(plan: ShardPlan, annotations: dict[int, Any], data_cfg: DataConfig, root: Location,
                 base: Location, layout: MemberLayout, seed: int) -> dict[str, Any]:
    """Ray task: read the plan's samples from the cubes under `root` (each sample's fixed crop, as
    evaluation reads it: `crop_rng` without an epoch; the layout's channels), write the tar to a
    temp name, move it into place under `base`, then write the completion record (the manifest
    entry of this shard)."""
    cache = get_cache(root)
    members, skipped, keys_skipped = [], [], []
    for _, sample in plan.items:
        try:
            raw = read_sample(sample, annotations, cache, data_cfg, crop_rng(data_cfg.crop_policy, seed, sample.key),
                              channels=layout.channels)
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
        with writing_to(target.url):  # a full disk or no permission, named by the shard
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
    locations: DataLocations,
    out: str | Location,
    length: int,
    splits: Sequence[str] = ("train", "val", "test"),
    samples_per_shard: int = 64,
    dtype: Literal["float32", "float16"] = "float32",
    compress: bool = False,
    all_channels: bool = False,
    seed: int = 0,
    max_in_flight: int = 8,
    num_cpus: float = 0.5,
) -> ExportReport:
    """Export the dataset under `data_cfg.root` for series length `length` as WebDataset shards,
    one Ray task per shard. Samples hold the configured channels (as published shards do), or all
    nine with `all_channels`, so that one export serves any channel subset. Complete shards of an
    earlier run (completion record + tar of the recorded size and sha256, same planned samples,
    same layout) are kept; the manifest is written atomically at the end. `locations` (the config's) and
    `out` (a Location, or a local path) carry their storage settings."""
    import ray

    from thalia_ray.progress import bar

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype {dtype!r}: allowed float32, float16")
    started = time.perf_counter()
    cfg = DataConfig.model_validate({**data_cfg.model_dump(), "length": length})
    root = locations.root
    index = SampleIndex.from_config(cfg, seed, location=root)
    layout = MemberLayout(tuple(schema.ALL_CHANNELS if all_channels else cfg.channels), dtype, compress,
                          cfg.crop_policy, seed if cfg.crop_policy == "reference" else None)
    base = shard_root(local(out), length)
    report = ExportReport(root=base.url, length=length, left_out=index.problems)
    records: dict[str, dict[str, Any]] = {}
    pending = []
    task = ray.remote(_write_shard).options(num_cpus=num_cpus)  # no runtime_env: Ray logs it
    plans = list(plan_shards(index, splits, samples_per_shard))
    progress = bar(len(plans), "export", unit="shard")
    stop = interrupts.current()
    signal_at = stop.signal_at

    def collect(ready: list[Any]) -> None:
        for record in ray.get(ready):
            records[record["name"]] = record
            progress.update(1)
            if signal_at is not None:
                signal_at.fire("after-unit", len(records), stop)

    with stop.graceful(f"export to {base.url}"):  # on a stop: no new shard; those being written finish
        for plan in plans:
            if stop.requested:
                break
            done = _completed(base, plan, layout)
            if done is not None:
                records[plan.name] = done
                report.shards_kept += 1
                progress.update(1)
                continue
            if len(pending) >= max_in_flight:  # bounded: never more than max_in_flight shards in memory
                ready, pending = ray.wait(pending, num_returns=1)
                collect(ready)
            uids = {u for _, s in plan.items for u in s.unique_ids}
            subset = {u: index.annotations[u] for u in uids}
            pending.append(task.remote(plan, subset, cfg, root, base, layout, seed))
            report.shards_written += 1
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            collect(ready)
    progress.close()
    if stop.requested:
        raise interrupts.interrupted(
            f"export to {base.url} interrupted by {stop.requested_signal()}: {len(records)} of {len(plans)} shards "
            "complete (kept, with their completion records; no manifest yet); rerun the same command to finish", stop)
    shards = [records[name] for name in sorted(records)]
    for shard in shards:
        folder = shard["name"].split("/", 1)[0]
        report.samples[folder] = report.samples.get(folder, 0) + shard["samples"]
        report.bytes += shard["bytes"]
        report.skipped.extend(shard["skipped"])
    manifest = {
        "format": FORMAT, "length": length, "channels": list(layout.channels), "dtype": dtype,
        "compress": compress, "crop": cfg.crop, "mask_target": cfg.mask_target, "policy": cfg.policy, "padding": cfg.padding,
        "label_rule": cfg.label_rule,
        "crop_policy": cfg.crop_policy, "seed": seed, "splits": list(splits),
        "shards": [{k: v for k, v in s.items() if k not in ("skipped_keys", "layout")} for s in shards],
        "left_out": [item.row() for item in index.left_out],  # what the index left out: runs on these shards say so
    }
    base.join(MANIFEST).write_json(manifest, indent=None)
    report.seconds = time.perf_counter() - started
    return report
