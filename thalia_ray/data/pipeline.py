"""Ray Data datasets for train/val/test from minicubes or WebDataset shards, streamed into Ray Train.

Each split is a `Datasource` whose read tasks are planned when an execution starts, i.e. once per
epoch: Ray Train's `streaming_split` coordinator starts an execution only after every worker has
asked for the next epoch, and every worker calls `set_epoch` before that. `get_read_tasks` asks the
run's epoch-control actor for the epoch and plans exactly that epoch's samples (every positive plus
a fresh, seeded draw of as many negatives; val/test: everything, in index order), so the set of
samples is the same whether they come from cubes or shards. Read tasks fetch raw data (windowed Zarr
reads, or the byte ranges of shard members); decoding, normalisation and augmentation run in
`map_batches`. Read and map tasks ask for a quarter CPU, so trainers on a small machine cannot
starve them. Unreadable samples are counted per epoch with their cube or shard and key by the same
actor and skipped up to `data.max_bad_samples` (or fail at once with `on_bad_sample: fail`).
"""
from __future__ import annotations

import dataclasses
import functools
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import Datasource, ReadTask

from thalia_ray.config import DataConfig, ThaliaConfig
from thalia_ray.data.cube import DataError, crop_rng
from thalia_ray.data.index import sample_rng
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.samples import BadSample
from thalia_ray.data.shards.tar import ShardError, UnsafeShardError
from thalia_ray.data.sources import Source, open_source
from thalia_ray.data.transforms import finalize, statistics_for
from thalia_ray.storage import Location

READ_CPUS = 0.25  # per read task and per map task: trainers holding most CPUs cannot starve Data
NAMESPACE = "thalia_ray"
_STRING_COLUMNS = ("key", "frame_id", "intensity", "activity_type")

__all__ = ["DataError", "Datasets", "EpochHandle", "TorchCollate", "bad_sample_report", "build_datasets", "set_epoch"]


# ------------------------------------------------------------------------------ epoch control
@ray.remote(num_cpus=0)
class EpochControl:
    """The current epoch of a run and its bad-sample ledger, shared by trainers and read tasks."""

    def __init__(self, policy: str, max_bad: int) -> None:
        self.epoch = 0
        self.policy, self.max_bad = policy, max_bad
        self.bad: dict[int, list[dict[str, str]]] = {}

    def set_epoch(self, epoch: int) -> int:
        self.epoch = int(epoch)
        return self.epoch

    def get_epoch(self) -> int:
        return self.epoch

    def record_bad(self, epoch: int, split: str, origin: str, key: str, reason: str) -> int:
        """Record one bad sample; returns how many this epoch has now."""
        entry = {"split": split, "origin": origin, "key": key, "reason": reason}
        records = self.bad.setdefault(int(epoch), [])
        if entry not in records:  # a re-executed task reports the same sample again
            records.append(entry)
        return len(records)

    def report(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "max_bad_samples": self.max_bad,
            "epochs": {str(e): {"count": len(r), "samples": list(r)} for e, r in sorted(self.bad.items())},
        }


@dataclass(frozen=True)
class EpochHandle:
    """Picklable handle of a run's EpochControl actor. It carries the actor handle itself, which keeps
    the (non-detached) actor alive as long as the driver's Datasets and its copies exist; the name
    lets other drivers find it with `ray.get_actor(name, namespace=NAMESPACE)`."""

    name: str
    handle: Any = field(compare=False, repr=False)

    def actor(self) -> Any:
        return self.handle


def set_epoch(handle: EpochHandle, epoch: int) -> None:
    """Call on every training worker before iterating its train shard for `epoch`."""
    ray.get(handle.actor().set_epoch.remote(epoch))


def bad_sample_report(handle: EpochHandle) -> dict[str, Any]:
    """`{"policy", "max_bad_samples", "epochs": {epoch: {"count", "samples": [{split, origin, key, reason}]}}}`."""
    return ray.get(handle.actor().report.remote())


# ------------------------------------------------------------------------------ epoch draws
@dataclass(frozen=True)
class Spec:
    """What read and map tasks need to know about a split (small and picklable)."""

    source: Source  # a task copy (see Source.for_items)
    split: str
    data: DataConfig
    statistics: Location  # where the normalisation statistics live, with its storage options
    seed: int
    handle: EpochHandle

    @property
    def training(self) -> bool:
        return self.split == "train"

    def rng(self, epoch: int, key: str) -> np.random.Generator:
        return sample_rng(self.seed, epoch, key)

    def crop_rng(self, epoch: int, key: str) -> np.random.Generator | None:
        return crop_rng(self.data.crop_policy, self.seed, key, epoch if self.training else None)


def report_bad(spec: Spec, epoch: int, bad: BadSample) -> None:
    """Count a bad sample; raise DataError under the `fail` policy or past `max_bad_samples`."""
    count = ray.get(spec.handle.actor().record_bad.remote(epoch, spec.split, bad.origin, bad.key, bad.reason))
    what = f"{bad.origin}, key {bad.key}: {bad.reason}"
    if spec.data.on_bad_sample == "fail":
        raise DataError(f"bad sample (data.on_bad_sample=fail) in {spec.split} epoch {epoch}: {what}")
    if count > spec.data.max_bad_samples:
        raise DataError(
            f"{count} bad samples in epoch {epoch} exceed data.max_bad_samples={spec.data.max_bad_samples}; "
            f"latest: {what} (see bad_sample_report)"
        )


# ------------------------------------------------------------------------------------ reading
def _read(spec: Spec, epoch: int, items: Sequence[Any]) -> Iterator[Any]:
    """The source's raw rows of `items` as one block (bad samples reported)."""
    rows: dict[str, list[Any]] = {}
    for row in spec.source.read(items, lambda key: spec.crop_rng(epoch, key)):
        if isinstance(row, BadSample):
            report_bad(spec, epoch, row)
            continue
        for name, value in row.items():
            rows.setdefault(name, []).append(value)
    if rows:
        yield BlockAccessor.batch_to_block({k: _column(v) for k, v in rows.items()})


def _column(values: list[Any]) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    if isinstance(values[0], (str, bytes)):
        return np.array(values, dtype=object)
    return np.asarray(values)


class EpochDatasource(Datasource):
    """Plans one epoch's read tasks when an execution starts (see the module docstring)."""

    def __init__(self, spec: Spec, source: Source, sample_bytes: int) -> None:
        super().__init__()
        self.spec, self.source, self.sample_bytes = spec, source, sample_bytes

    def get_name(self) -> str:
        return f"Thalia{self.source.name.capitalize()}[{self.spec.split}]"

    def items(self, epoch: int) -> list[Any]:
        return self.source.epoch_items(self.spec.split, epoch)

    def estimate_inmemory_data_size(self) -> int | None:
        return len(self.items(0)) * self.sample_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        epoch = ray.get(self.spec.handle.actor().get_epoch.remote()) if self.spec.training else 0
        items = self.items(epoch)
        size = self.spec.data.samples_per_read_task
        tasks = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            spec = dataclasses.replace(self.spec, source=self.source.for_items(chunk))
            read = functools.partial(_read, spec, epoch, chunk)
            meta = BlockMetadata(num_rows=len(chunk), size_bytes=len(chunk) * self.sample_bytes,
                                 input_files=None, exec_stats=None)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


# ------------------------------------------------------------------------------------ decoding
def finalize_batch(batch: dict[str, np.ndarray], spec: Spec) -> dict[str, np.ndarray]:
    """map_batches: raw rows → model-ready records (decode, normalise, augment); bad rows reported."""
    epoch = ray.get(spec.handle.actor().get_epoch.remote()) if spec.training else 0
    stats = statistics_for(spec.statistics) if spec.data.normalize else None
    records = []
    for i in range(len(batch["key"])):
        key = str(batch["key"][i])
        try:
            raw = spec.source.decode({name: column[i] for name, column in batch.items()}, spec.split)
            record = finalize(raw, spec.data, stats, spec.rng(epoch, key), spec.training)
        except UnsafeShardError:
            raise
        except (DataError, ShardError, ValueError, KeyError) as err:
            report_bad(spec, epoch, BadSample(str(batch["origin"][i]), key, f"{type(err).__name__}: {err}"))
            continue
        records.append(record)
    if not records:
        return {}
    return {name: _column([r[name] for r in records]) if name in _STRING_COLUMNS
            else np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}


# ------------------------------------------------------------------------------------ datasets
class TorchCollate(NumpyBatchCollateFn):
    """Numeric columns → torch tensors; string columns (key, frame_id, ...) → lists of str.

    Batches that arrive as read-only views of Ray's object store are copied once, so the tensors
    the loop receives are its own to modify."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for name, values in batch.items():
            if values.dtype.kind in "OUS":
                out[name] = [str(v) for v in values]
            else:
                values = np.ascontiguousarray(values)
                out[name] = torch.from_numpy(values if values.flags.writeable else values.copy())
        return out


@dataclass
class Datasets:
    datasets: dict[str, ray.data.Dataset]
    sizes: dict[str, int]  # samples per epoch per split (before any bad sample is skipped)
    epoch_control: EpochHandle


def _sample_bytes(data: DataConfig) -> int:
    return 4 * data.length * (len(data.channels) + 1) * data.crop * data.crop


def _start_control(cfg: ThaliaConfig, run_id: str | None) -> EpochHandle:
    name = f"thalia-epoch-{run_id or uuid.uuid4().hex[:12]}"
    actor = EpochControl.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
        cfg.data.on_bad_sample, cfg.data.max_bad_samples
    )
    return EpochHandle(name, actor)


def build_datasets(cfg: ThaliaConfig, splits: Sequence[str] = ("train", "val", "test"),
                   run_id: str | None = None) -> Datasets:
    """One Ray dataset per split from `cfg.data.source`; see the module docstring."""
    locations = DataLocations.of(cfg.data, cfg.storage)
    source = open_source(cfg, locations, splits)
    handle = _start_control(cfg, run_id)
    datasets, sizes = {}, {}
    for split in splits:
        spec = Spec(source.for_items([]), split, cfg.data, locations.statistics, cfg.seed, handle)
        datasource = EpochDatasource(spec, source, _sample_bytes(cfg.data))
        sizes[split] = len(datasource.items(0))
        # No runtime_env: Ray logs it, and credentials reach workers through their environment.
        ds = ray.data.read_datasource(datasource, num_cpus=READ_CPUS)
        ds = ds.map_batches(finalize_batch, fn_kwargs={"spec": spec}, batch_size=None,
                            batch_format="numpy", num_cpus=READ_CPUS)
        if cfg.runtime.data_cpu_limit is not None:
            ds.context.execution_options.resource_limits = ds.context.execution_options.resource_limits.copy(
                cpu=cfg.runtime.data_cpu_limit)
        ds.context.execution_options.preserve_order = not spec.training or cfg.train.deterministic
        datasets[split] = ds
    return Datasets(datasets, sizes, handle)
