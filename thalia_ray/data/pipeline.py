"""Ray Data datasets for train/val/test from minicubes or WebDataset shards, streamed into Ray Train.

Each split is a `Datasource` whose read tasks are planned when an execution starts, i.e. once per
epoch: Ray Train's `streaming_split` coordinator starts an execution only after every worker has
asked for the next epoch, and every worker calls `set_epoch` before that. `get_read_tasks` asks the
run's epoch-control actor for the epoch and plans exactly that epoch's samples (every positive plus
a fresh, seeded draw of as many negatives; val/test: everything, in index order), so the set of
samples is the same whether they come from cubes or shards.

Execution is designed by measurement (BENCHMARKS.md, ../shared/docs/ray-notes.md "Worker-process
churn"): a read task does a sample's whole work (windowed Zarr read or ranged shard read, decode,
normalise, augment) in one process, so raw arrays never round-trip the object store, and yields
one model-ready block of `data.samples_per_read_task` samples (blocks sized to batches; Ray Data
is told the block count so it does not split them into one-row blocks). A `DataBudget` sets how
many read tasks run at once (one busy process per core) and sizes their CPU requests to fit what
the trainers leave, so Ray never packs several read processes onto a core. The worker processes they run
in are kept between epochs (`runtime.worker_reuse_config`), and with them the open cubes, parsed
`.npy` headers and imports. Training workers start the next epoch's execution before validating
(`EpochStart`), so its first blocks are read while validation runs.
Unreadable samples are counted per epoch with their cube or shard and key by the epoch-control
actor and skipped up to `data.max_bad_samples` (or fail at once with `on_bad_sample: fail`).
"""
from __future__ import annotations

import functools
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import Datasource, ReadTask

from thalia_ray.config import DataConfig, ThaliaConfig
from thalia_ray.data import shards as shard_io
from thalia_ray.data.cube import DataError, RawSample, crop_window, get_cache, read_raw
from thalia_ray.data.index import Sample, SampleIndex, epoch_draw, group_rng
from thalia_ray.data.transforms import finalize, statistics_for

MIN_TASK_CPUS = 0.25  # a read task's CPUs when trainers leave less than one to Ray Data
NAMESPACE = "thalia_ray"
_STRING_COLUMNS = ("key", "frame_id", "intensity", "activity_type")

__all__ = ["DataError", "Datasets", "EpochHandle", "EpochStart", "TorchCollate", "bad_sample_report", "build_datasets", "set_epoch"]


# ------------------------------------------------------------------------------ epoch control
@ray.remote(num_cpus=0)
class EpochControl:
    """The current epoch of a run and its bad-sample ledger, shared by trainers and read tasks."""

    def __init__(self, policy: str, max_bad: int) -> None:
        self.epoch = 0
        self.policy, self.max_bad = policy, max_bad
        self.bad: dict[int, list[dict[str, str]]] = {}
        self.progress = (0, 0)

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

    def advance(self, epoch: int, steps: int) -> None:
        """Rank 0's training progress (epoch, steps done), for the driver's progress bar."""
        self.progress = (int(epoch), int(steps))

    def get_progress(self) -> tuple[int, int]:
        return self.progress

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


class EpochStart:
    """An epoch's batches whose first one is fetched in a background thread, so that Ray Data plans
    the epoch and reads its first blocks while the caller does other work (validation)."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self._batches = iter(batches)
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, name="thalia-epoch-start", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first = [next(self._batches)]
        except StopIteration:
            pass
        except BaseException as err:  # noqa: BLE001 - raised in the consuming thread instead
            self._error = err

    def __iter__(self) -> Generator[Any, None, None]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._batches


def bad_sample_report(handle: EpochHandle) -> dict[str, Any]:
    """`{"policy", "max_bad_samples", "epochs": {epoch: {"count", "samples": [{split, origin, key, reason}]}}}`."""
    return ray.get(handle.actor().report.remote())


# ------------------------------------------------------------------------------ epoch draws
@dataclass(frozen=True)
class Spec:
    """What read and map tasks need to know about a split (small and picklable)."""

    kind: str  # "cube", "own" or "published"
    split: str
    data: DataConfig
    storage: Any
    seed: int
    handle: EpochHandle
    stored_channels: tuple[str, ...] = ()  # own shards: the channels the export holds (its manifest)

    @property
    def training(self) -> bool:
        return self.split == "train"

    def rng(self, epoch: int, key: str) -> np.random.Generator:
        return group_rng(self.seed, "sample", epoch, key)


@dataclass
class BadSample:
    origin: str  # the cube URL or shard URL
    key: str
    reason: str


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
def cube_record(spec: Spec, epoch: int, sample: Sample, annotations: dict[int, Any]) -> dict[str, Any]:
    """One cube sample's whole per-sample work: crop window, windowed read, finalize (may raise)."""
    cache = get_cache(spec.data.root, spec.storage)
    rng = spec.rng(epoch, sample.key) if spec.training else None
    window = crop_window(sample, annotations, cache.get(sample.frame_id).shape, spec.data.crop, rng,
                         spec.data.mask_target)
    raw = read_raw(sample, cache, window, spec.data.channels, annotations)
    return _finalize(spec, epoch, raw)


def shard_record(spec: Spec, epoch: int, entry: shard_io.ShardEntry, blob: Any) -> dict[str, Any]:
    """One shard sample's whole per-sample work once its bytes are fetched: decode, finalize (may raise)."""
    return _finalize(spec, epoch, _decode(spec, entry, blob))


def _finalize(spec: Spec, epoch: int, raw: RawSample) -> dict[str, Any]:
    stats = statistics_for(spec.data) if spec.data.normalize else None
    return finalize(raw, spec.data, stats, spec.rng(epoch, raw.key), spec.training)


def _decode(spec: Spec, entry: shard_io.ShardEntry, blob: Any) -> RawSample:
    members = shard_io.parse_members(blob, entry.where).get(entry.key)
    if members is None:
        raise shard_io.ShardError(f"{entry.where}: the manifest's byte range holds no members of this key")
    if spec.kind == "own":
        raw = shard_io.decode_own(members, entry, spec.data.channels, spec.stored_channels)
    else:
        raw = shard_io.decode_published(members, entry, spec.data, spec.split)
    bad = int(np.size(raw.image) - np.isfinite(raw.image).sum())
    if bad:
        raise shard_io.ShardError(f"{entry.where}: {bad} non-finite image values")
    return raw


Load = Callable[[], dict[str, Any]]
Rows = Callable[[], Iterator[tuple[str, str, Load]]]


def _read_cube(spec: Spec, epoch: int, samples: Sequence[Sample], annotations: dict[int, Any]
               ) -> Iterator[tuple[str, str, Load]]:
    """(origin, key, load) per sample: windowed Zarr reads of the crops, in planned order."""
    root = get_cache(spec.data.root, spec.storage).root
    for sample in samples:
        origin = root.join(f"{sample.frame_id}.zarr").url
        yield origin, sample.key, functools.partial(cube_record, spec, epoch, sample, annotations)


def _read_shards(spec: Spec, epoch: int, entries: Sequence[shard_io.ShardEntry]) -> Iterator[tuple[str, str, Load]]:
    """(origin, key, load) per entry: ranged reads of the tar members, a run of neighbours per request."""
    for entry, data in shard_io.fetch_ranges(entries, spec.storage):
        if isinstance(data, Exception):
            yield entry.shard, entry.key, functools.partial(_raise, data)
        else:
            yield entry.shard, entry.key, functools.partial(shard_record, spec, epoch, entry, data)


def _raise(err: Exception) -> dict[str, Any]:
    raise err


def records_block(spec: Spec, epoch: int, items: Iterator[tuple[str, str, Load]]) -> Iterator[Any]:
    """A read task's body: read, decode and finalize its samples in one process (raw data never
    crosses the object store) and yield them as one model-ready block; bad samples are reported."""
    records = []
    for origin, key, load in items:
        try:
            records.append(load())
        except shard_io.UnsafeShardError:
            raise
        except (DataError, shard_io.ShardError, OSError, ValueError, KeyError) as err:
            report_bad(spec, epoch, BadSample(origin, key, f"{type(err).__name__}: {err}"))
    if records:
        yield BlockAccessor.batch_to_block(records_to_batch(records))


def records_to_batch(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {name: _column([r[name] for r in records]) if name in _STRING_COLUMNS
            else np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}


def _column(values: list[Any]) -> np.ndarray:
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    if isinstance(values[0], (str, bytes)):
        return np.array(values, dtype=object)
    return np.asarray(values)


class EpochDatasource(Datasource):
    """Plans one epoch's read tasks when an execution starts (see the module docstring)."""

    def __init__(self, spec: Spec, index: SampleIndex | None, entries: list[shard_io.ShardEntry] | None,
                 sample_bytes: int, samples_per_task: int) -> None:
        super().__init__()
        self.spec, self.index, self.entries, self.sample_bytes = spec, index, entries, sample_bytes
        self.samples_per_task = samples_per_task

    def get_name(self) -> str:
        return f"Thalia{self.spec.kind.capitalize()}[{self.spec.split}]"

    def items(self, epoch: int) -> list[Any]:
        if self.index is not None:
            return self.index.epoch(self.spec.split, epoch, self.spec.seed)
        return epoch_draw(self.entries or [], self.spec.split, epoch, self.spec.seed, self.spec.data.balance)

    def num_tasks(self) -> int:
        """Read tasks per epoch (constant: a balanced draw has as many negatives as positives)."""
        return max(1, math.ceil(len(self.items(0)) / self.samples_per_task))

    def estimate_inmemory_data_size(self) -> int | None:
        return len(self.items(0)) * self.sample_bytes

    def chunks(self, epoch: int) -> list[tuple[int, Rows]]:
        """An epoch's samples in read-task-sized chunks: (size, rows) where `rows()` yields each
        sample's (origin, key, load). The bench's DataLoader baseline runs exactly these."""
        items = self.items(epoch)
        out = []
        for start in range(0, len(items), self.samples_per_task):
            chunk = items[start:start + self.samples_per_task]
            if self.index is not None:
                annotations = {u: self.index.annotations[u] for s in chunk for u in s.unique_ids}
                out.append((len(chunk), functools.partial(_read_cube, self.spec, epoch, chunk, annotations)))
            else:
                out.append((len(chunk), functools.partial(_read_shards, self.spec, epoch, chunk)))
        return out

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        epoch = ray.get(self.spec.handle.actor().get_epoch.remote()) if self.spec.training else 0
        return [ReadTask(functools.partial(_task, self.spec, epoch, rows),
                         BlockMetadata(num_rows=n, size_bytes=n * self.sample_bytes, input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for n, rows in self.chunks(epoch)]


def _task(spec: Spec, epoch: int, rows: Rows) -> Iterator[Any]:
    return records_block(spec, epoch, rows())


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
    sources: dict[str, EpochDatasource] = field(default_factory=dict)  # per split: what the reads do


def _sample_bytes(data: DataConfig) -> int:
    return 4 * data.length * (len(data.channels) + 1) * data.crop * data.crop


def _shard_entries(cfg: ThaliaConfig, split: str) -> tuple[str, list[shard_io.ShardEntry], tuple[str, ...]]:
    """(kind, entries, stored channels) of a split's shards, checked against the config first."""
    data = cfg.data
    if data.shard_format == "published":
        entries = shard_io.scan_published(data.shards, data.length, split, data.label_rule, cfg.storage)
        return "published", entries, ()
    if data.policy == "resample":
        raise ValueError("data.policy=resample re-draws series every epoch; shards hold the fixed enumerate "
                         "series: use data.source=cube")
    manifest = shard_io.load_manifest(data.shards, data.length, cfg.storage)
    if manifest["label_rule"] != data.label_rule:
        raise ValueError(f"shards under {data.shards} were exported with label_rule={manifest['label_rule']!r}, "
                         f"the config asks for {data.label_rule!r}")
    if split not in manifest["splits"]:
        raise ValueError(f"shards under {data.shards} hold splits {manifest['splits']}, not {split!r}")
    missing = [c for c in data.channels if c not in manifest["channels"]]
    if missing:
        raise ValueError(f"data.geomorphology/data.atmospheric: channels {missing} are not in the shards under "
                         f"{data.shards} (they hold "
                         f"{manifest['channels']}); export again with these channels or with --all-channels")
    base = shard_io.shard_root(data.shards, data.length, cfg.storage)
    return "own", shard_io.manifest_entries(manifest, base, split), tuple(manifest["channels"])


def _start_control(cfg: ThaliaConfig, run_id: str | None) -> EpochHandle:
    name = f"thalia-epoch-{run_id or uuid.uuid4().hex[:12]}"
    actor = EpochControl.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote(
        cfg.data.on_bad_sample, cfg.data.max_bad_samples
    )
    return EpochHandle(name, actor)


@dataclass(frozen=True)
class DataBudget:
    """Read tasks that run at once (`processes`: each keeps one core busy) and the Ray CPUs each asks for."""

    processes: int
    task_cpus: float

    @property
    def cpus(self) -> float:
        return self.processes * self.task_cpus


def data_budget(cfg: ThaliaConfig, total_cpus: float, trainer_cpus: float = 0.0) -> DataBudget:
    """Ray Data's share: `runtime.data_cpu_limit` busy read processes, by default one per CPU of the
    cluster, whose CPU requests together fit in what the trainers leave (and in the limit). The trainers
    mostly wait for data or a GPU, so readers share their cores as a DataLoader's workers share the
    training process's (measured: `bench e2e` 0.93× of a plain script with one reader per core, 0.74×
    with one per CPU the trainers leave); what Ray no longer does is pack four quarter-CPU processes
    onto every core."""
    free = max(float(total_cpus) - trainer_cpus, MIN_TASK_CPUS)
    limit = cfg.runtime.data_cpu_limit
    processes = max(1, math.floor(limit if limit is not None else total_cpus))
    return DataBudget(processes, min(1.0, free / processes, (limit or free) / processes))


def build_datasets(cfg: ThaliaConfig, splits: Sequence[str] = ("train", "val", "test"),
                   run_id: str | None = None, trainer_cpus: float = 0.0) -> Datasets:
    """One Ray dataset per split from `cfg.data.source`; see the module docstring.

    `trainer_cpus`: the CPUs the Ray Train workers hold, left out of Ray Data's budget."""
    handle = _start_control(cfg, run_id)
    index = SampleIndex.from_config(cfg.data, cfg.seed) if cfg.data.source == "cube" else None
    budget = data_budget(cfg, ray.cluster_resources().get("CPU", 1.0), trainer_cpus)
    datasets, sizes, sources = {}, {}, {}
    for split in splits:
        if index is not None:
            kind, entries, stored = "cube", None, ()
        else:
            kind, entries, stored = _shard_entries(cfg, split)
        spec = Spec(kind, split, cfg.data, cfg.storage, cfg.seed, handle, stored)
        source = EpochDatasource(spec, index, entries, _sample_bytes(cfg.data), cfg.data.samples_per_read_task)
        sizes[split], sources[split] = len(source.items(0)), source
        options = shard_io.remote_args(budget.task_cpus, cfg.data.root if kind == "cube" else cfg.data.shards)
        extra = {k: v for k, v in options.items() if k != "num_cpus"}  # runtime_env for S3, when needed
        # One block per read task, as planned: without override_num_blocks Ray Data splits small
        # reads into one-row blocks to reach its default parallelism (SplitBlocks in the plan).
        ds = ray.data.read_datasource(source, num_cpus=budget.task_cpus, override_num_blocks=source.num_tasks(),
                                      ray_remote_args=extra or None)
        options_ = ds.context.execution_options
        options_.resource_limits = options_.resource_limits.copy(cpu=budget.cpus)
        options_.preserve_order = not spec.training or cfg.train.deterministic
        datasets[split] = ds
    return Datasets(datasets, sizes, handle, sources)
