"""Ray Data datasets for train/val/test from minicubes or WebDataset shards, streamed into Ray Train.

Each split is a `Datasource` whose read tasks are planned when an execution starts, i.e. once per
epoch: Ray Train's `streaming_split` coordinator starts an execution only after every worker has
asked for the next epoch, and every worker calls `set_epoch` before that. `get_read_tasks` asks the
run's epoch-control actor for the epoch and plans exactly that epoch's samples (every positive plus
a fresh, seeded draw of as many negatives; val/test: everything, in index order), so the set of
samples is the same whether they come from cubes or shards.

Execution is designed by measurement (BENCHMARKS.md): a read task does its samples' whole work
(the source's windowed Zarr read or ranged shard read, decode, normalise, augment) in one process,
so raw arrays never round-trip the object store, and streams a model-ready block every
`data.samples_per_block` samples (a few batches: Ray Data's cost is per block; it is told the task
count so it does not split them into one-row blocks). Tasks are long (`data.samples_per_read_task`, by default
about four per read process an epoch): each task start costs its process a scheduling round trip and
~0.1 s of set-up, which short tasks paid every few samples. A `DataBudget` sets how many read tasks run at once
(one busy process per core) and sizes their CPU requests to fit what the trainers leave, so Ray
never packs several read processes onto a core. The worker processes they run in are kept between
epochs (`runtime.worker_reuse_config`), and with them the open cubes, parsed `.npy` headers and
imports.

The train split is `LANES` datasets over the same datasource (lanes): epoch e streams through lane
e % LANES, so the next epoch's execution can start while this one still streams. Consumers start it
(`EpochLanes.start`) as soon as the current epoch delivers its first batch, so that an execution is
always planned and reading ahead (as far as Ray Data's backpressure lets it), and validation a few
seconds before the epoch's expected end (`EpochLead`): Ray Data's planning and start-up and the new
execution's first tasks then overlap the last tasks of the current epoch, whose readers
would otherwise idle one by one as it runs out (BENCHMARKS.md, issue 13). Each lane plans
its own epoch (`EpochControl.get_epoch(lane)`), so every epoch is still its own execution: the same draw,
each sample once across workers, and the equal split that keeps DDP's ranks in step.
Unreadable samples are counted per epoch with their cube or shard and key by the epoch-control
actor and skipped up to `data.max_bad_samples` (or fail at once with `on_bad_sample: fail`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence, Union

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import Datasource, ReadTask

from thalia_ray.config import DataConfig, ThaliaConfig
from thalia_ray.data.annotations import LeftOut
from thalia_ray.data.cube import DataError, crop_rng
from thalia_ray.data.execution import ClusterLimits, IdleBackoff
from thalia_ray.data.index import sample_rng
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.samples import BadSample
from thalia_ray.data.shards.tar import ShardError, UnsafeShardError
from thalia_ray.data.sources import Row, Source, open_source
from thalia_ray.data.transforms import statistics_for
from thalia_ray.ray_internals import add_execution_callbacks
from thalia_ray.storage import Location, S3Options
from thalia_ray.traffic import TRAFFIC, Traffic

MIN_TASK_CPUS = 0.25  # a read task's CPUs when trainers leave less than one to Ray Data
BLOCK_LIMIT_FRACTION = 0.9  # of a block's estimated bytes (see block_size_limit)
SHORT_TASKS_PER_READER = 2  # quarter-block tasks that start each epoch (see task_bounds)
TASKS_PER_READER = 4  # read tasks per read process an epoch: few start-ups, and no reader idles long at the end
LANES = 2  # datasets the train split alternates between (see the module docstring)
# Ray Data's default share of the object store for one execution (half), split between the executions
# that may stream at once: the train split's lanes and validation. It bounds how far each reads ahead.
OBJECT_STORE_FRACTION = 0.5 / (LANES + 1)
LEAD_S = 3.0  # seconds before an epoch's expected end when validation starts (see EpochLead)
LEAD_FRACTION = 0.75  # of an epoch's batches after which validation starts in any case
NAMESPACE = "thalia_ray"
_STRING_COLUMNS = ("key", "frame_id", "intensity", "activity_type")

__all__ = ["DataError", "Datasets", "EpochHandle", "EpochLanes", "EpochLead", "EpochStart", "TorchCollate",
           "bad_sample_report", "build_datasets", "epoch_traffic", "lane_name", "set_epoch", "set_eval_epoch",
           "skipped_samples"]


# ------------------------------------------------------------------------------ epoch control
@ray.remote(num_cpus=0)
class EpochControl:
    """The epoch each lane of a run streams and the run's bad-sample ledger, shared by trainers and read tasks."""

    def __init__(self, policy: str, max_bad: int) -> None:
        self.epochs: dict[int, int] = {}  # lane -> the epoch it streams next (or now)
        self.eval_epoch = 0  # the epoch whose validation streams next (or now)
        self.traffic: dict[int, Traffic] = {}  # epoch -> storage traffic of its train and val reads
        self.policy, self.max_bad = policy, max_bad
        self.bad: dict[int, list[dict[str, str]]] = {}
        self.progress = (0, 0)

    def set_epoch(self, epoch: int) -> int:
        self.epochs[int(epoch) % LANES] = int(epoch)
        return int(epoch)

    def get_epoch(self, lane: int) -> int:
        """The epoch lane `lane` plans; before any `set_epoch`, the lane's first (epoch `lane`)."""
        return self.epochs.get(lane, lane)

    def set_eval_epoch(self, epoch: int) -> None:
        self.eval_epoch = int(epoch)

    def get_eval_epoch(self) -> int:
        return self.eval_epoch

    def record_traffic(self, epoch: int, traffic: Traffic) -> None:
        """Add one read task's storage traffic to its epoch's."""
        self.traffic[int(epoch)] = self.traffic.get(int(epoch), Traffic()) + traffic

    def epoch_traffic(self, epoch: int) -> Traffic:
        return self.traffic.get(int(epoch), Traffic())

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
    """Call on every training worker before iterating its train shard for `epoch` (on `lane_name("train", epoch)`)."""
    ray.get(handle.actor().set_epoch.remote(epoch))


def set_eval_epoch(handle: EpochHandle, epoch: int) -> None:
    """Call before starting the validation of `epoch`: its reads' storage traffic counts to that epoch."""
    ray.get(handle.actor().set_eval_epoch.remote(epoch))


def epoch_traffic(handle: EpochHandle, epoch: int) -> Traffic:
    """The storage traffic (object_reads) of `epoch`'s train and validation reads, all readers together."""
    return ray.get(handle.actor().epoch_traffic.remote(epoch))


def lane_name(split: str, epoch: int) -> str:
    """The dataset that streams `split`'s epoch `epoch`: the split itself, or one of the train split's other lanes."""
    lane = epoch % LANES if split == "train" else 0
    return split if lane == 0 else f"{split}-lane{lane}"


@dataclass(frozen=True)
class EpochLead:
    """When a consumer of an epoch of `steps` batches, begun at `started` (perf_counter seconds), should
    start validation: once the batches left, at the pace so far, need at most `LEAD_S`, or once
    `LEAD_FRACTION` of them are taken. Ray Data needs about a second to plan and start an execution;
    started this early, validation's first tasks run as soon as the epoch's last ones free a core, and
    what it reads ahead stays a few seconds' worth."""

    steps: int
    started: float

    def due(self, taken: int, now: float) -> bool:
        left = self.steps - taken
        return left <= (1 - LEAD_FRACTION) * self.steps or left * (now - self.started) / taken <= LEAD_S


class EpochStart:
    """An epoch's batches whose first one is fetched in a background thread, so that Ray Data plans
    the epoch and reads its first blocks while the caller does other work (the end of the previous
    epoch, validation)."""

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


def skipped_samples(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A `bad_sample_report` as one row per skipped sample: {epoch, split, origin, key, reason}.

    `epoch` is the run's training epoch, counted from 1 as in its history, for train samples; val
    and test read the same samples every epoch and are listed once, without one."""
    return [{"epoch": int(epoch) + 1 if row["split"] == "train" else None, **row}
            for epoch, entry in report["epochs"].items() for row in entry["samples"]]


# ------------------------------------------------------------------------------ epoch draws
@dataclass(frozen=True)
class Spec:
    """What a read task needs to know about a split (small and picklable)."""

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
Load = Callable[[], dict[str, Any]]
Loads = Iterator[Union[BadSample, tuple[str, str, Load]]]  # per sample: what its read found, in planned order
Rows = Callable[[], Loads]


def sample_loads(spec: Spec, epoch: int, items: Sequence[Any]) -> Loads:
    """The source's reads of `items` (windowed Zarr reads or ranged shard reads), each sample's
    decode and finalize deferred to its `load()`; unreadable samples come as BadSample."""
    for row in spec.source.read(items, lambda key: spec.crop_rng(epoch, key)):
        if isinstance(row, BadSample):
            yield row
        else:
            yield str(row["origin"]), str(row["key"]), functools.partial(model_record, spec, epoch, row)


def model_record(spec: Spec, epoch: int, row: Row) -> dict[str, Any]:
    """One sample's record from its row: the source's decode, normalisation and augmentation (may raise
    for bad data)."""
    stats = statistics_for(spec.statistics) if spec.data.normalize else None
    return spec.source.record(row, spec.split, stats, spec.rng(epoch, str(row["key"])), spec.training)


def records_blocks(spec: Spec, epoch: int, loads: Loads) -> Iterator[Any]:
    """A read task's body: read, decode and finalize its samples in one process (raw data never
    crosses the object store), yielding a model-ready block every `samples_per_block` good samples
    (Ray Data streams each block on while the task goes on); bad samples are reported."""
    records = []
    for item in loads:
        if isinstance(item, BadSample):
            report_bad(spec, epoch, item)
            continue
        origin, key, load = item
        try:
            records.append(load())
        except UnsafeShardError:
            raise
        except (DataError, ShardError, OSError, ValueError, KeyError) as err:
            report_bad(spec, epoch, BadSample(origin, key, f"{type(err).__name__}: {err}"))
        if len(records) == spec.data.samples_per_block:
            yield BlockAccessor.batch_to_block(records_to_batch(records))
            records = []
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

    def __init__(self, spec: Spec, source: Source, sample_bytes: int, readers: int, lane: int = 0) -> None:
        super().__init__()
        self.spec, self.source, self.sample_bytes, self.readers, self.lane = spec, source, sample_bytes, readers, lane
        self.samples_per_task = task_size(spec.data, len(self.items(0)), readers)

    def get_name(self) -> str:
        return f"Thalia{self.source.name.capitalize()}[{self.spec.split}]"

    def items(self, epoch: int) -> list[Any]:
        return self.source.epoch_items(self.spec.split, epoch)

    def num_tasks(self) -> int:
        """Read tasks per epoch (constant for an equal draw; for random_mix, whose number of negatives
        varies, epoch 0's, which Ray Data takes as a hint)."""
        return max(1, len(self.bounds(len(self.items(0)))))

    def largest_epoch(self, epochs: int) -> int:
        """Samples in the largest of the first `epochs` epochs: every epoch has as many except under
        `balance_plan: random_mix`, whose number of negatives varies (the loop's step cap must fit them all)."""
        if not self.spec.training or self.spec.data.epoch_plan != "random_mix":
            return len(self.items(0))
        return max(len(self.items(epoch)) for epoch in range(epochs))

    def bounds(self, samples: int) -> list[tuple[int, int]]:
        return task_bounds(samples, self.samples_per_task, self.spec.data.samples_per_block, self.readers)

    def estimate_inmemory_data_size(self) -> int | None:
        return len(self.items(0)) * self.sample_bytes

    def chunks(self, epoch: int, size: int | None = None) -> list[tuple[int, Rows]]:
        """An epoch's samples in chunks of `size` (default: a read task's): (size, rows) where `rows()`
        yields each sample's (origin, key, load) or BadSample. The bench's DataLoader baseline runs
        exactly these, cut into batches."""
        items = self.items(epoch)
        if size is None:
            bounds = self.bounds(len(items))
        else:
            bounds = [(start, min(start + size, len(items))) for start in range(0, len(items), size)]
        out = []
        for start, end in bounds:
            chunk = items[start:end]
            spec = dataclasses.replace(self.spec, source=self.source.for_items(chunk))
            out.append((len(chunk), functools.partial(sample_loads, spec, epoch, chunk)))
        return out

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        control = self.spec.handle.actor()
        epoch = ray.get(control.get_epoch.remote(self.lane)) if self.spec.training else 0
        counted = epoch if self.spec.training else ray.get(control.get_eval_epoch.remote())
        return [ReadTask(functools.partial(_task, self.spec, epoch, rows, counted),
                         BlockMetadata(num_rows=n, size_bytes=n * self.sample_bytes, input_files=None, exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for n, rows in self.chunks(epoch)]


def _task(spec: Spec, epoch: int, rows: Rows, counted: int) -> Iterator[Any]:
    """A read task: its blocks, then its storage traffic reported to epoch `counted` (train: `epoch`;
    val/test: the epoch whose validation this is), before the task ends and so before its epoch does."""
    before = TRAFFIC.snapshot()
    yield from records_blocks(spec, epoch, rows())
    traffic = TRAFFIC.snapshot() - before
    if traffic:
        ray.get(spec.handle.actor().record_traffic.remote(counted, traffic))


def task_bounds(samples: int, per_task: int, per_block: int, readers: int = 1) -> list[tuple[int, int]]:
    """(start, end) of each read task over an epoch of `samples`: first two tasks of a quarter block per
    reader, then tasks of `per_task` samples. Ray's batch iterator hands out an epoch's first batch
    only once it holds its prefetch depth of rows beyond it, so the first few blocks of an epoch should
    come quickly (a block is passed on when it is full or its task ends)."""
    first = min(per_task, max(1, per_block // 4))
    short_end = min(samples, first * SHORT_TASKS_PER_READER * readers)
    short = [(start, min(start + first, short_end)) for start in range(0, short_end, first)]
    return short + [(start, min(start + per_task, samples)) for start in range(short_end, samples, per_task)]


def task_size(data: DataConfig, samples: int, readers: int) -> int:
    """Samples per read task: `data.samples_per_read_task`, or an epoch of `samples` cut into about
    `TASKS_PER_READER` tasks per read process, in whole blocks (an epoch too small for that gets
    tasks of less than a block, so that every reader still has work)."""
    if data.samples_per_read_task is not None:
        return data.samples_per_read_task
    share = max(1, math.ceil(samples / (readers * TASKS_PER_READER)))
    if share <= data.samples_per_block:
        return share
    return math.ceil(share / data.samples_per_block) * data.samples_per_block


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
    datasets: dict[str, ray.data.Dataset]  # per split, and per further lane of the train split (see lane_name)
    sizes: dict[str, int]  # samples per epoch per split (train: its largest epoch), before any bad sample is skipped
    epoch_control: EpochHandle
    sources: dict[str, EpochDatasource] = field(default_factory=dict)  # per split: what the reads do
    left_out: list[LeftOut] = field(default_factory=list)  # what the source's index left out, and why


def record_bytes(data: DataConfig) -> int:
    """Bytes of one model-ready record (see `transforms.finalize`): the float32 (T·C, H, W) image, the
    int64 mask (one per member for `mask_target: all`) and a few hundred bytes of labels and names."""
    masks = data.length if data.mask_target == "all" else 1
    return (4 * data.length * len(data.channels) + 8 * masks) * data.crop * data.crop + 256


def block_size_limit(data: DataConfig, sample_bytes: int | None = None) -> int:
    """The read operator's `target_max_block_size`: a little under one block of `samples_per_block`
    records (of `sample_bytes`, default `record_bytes(data)`), so Ray Data passes each block on as it
    comes (its output buffer holds blocks until they exceed the limit, and slices only those above
    1.5 × the limit); the default 128 MiB would hold a whole task's samples back until the task ends."""
    return int(BLOCK_LIMIT_FRACTION * data.samples_per_block * (sample_bytes or record_bytes(data)))


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
                   run_id: str | None = None, trainer_cpus: float = 0.0, source: Source | None = None) -> Datasets:
    """One Ray dataset per split from `source` (default: the one `cfg.data.source` names); see the
    module docstring.

    `trainer_cpus`: the CPUs the Ray Train workers will hold, left out of Ray Data's budget, as are the
    CPUs others hold right now (other sweep trials, an evaluation task that builds these datasets):
    read tasks asking for more than is left would never be scheduled."""
    locations = DataLocations.of(cfg.data, S3Options.of(cfg.storage))
    source = source if source is not None else open_source(cfg, locations, splits)
    handle = _start_control(cfg, run_id)
    total = ray.cluster_resources().get("CPU", 1.0)
    held = max(0.0, total - ray.available_resources().get("CPU", 0.0))
    budget = data_budget(cfg, total, trainer_cpus + held)
    datasets, sizes, sources = {}, {}, {}
    for split in splits:
        spec = Spec(source.for_items([]), split, cfg.data, locations.statistics, cfg.seed, handle)
        for lane in range(LANES if spec.training else 1):
            datasource = EpochDatasource(spec, source, record_bytes(cfg.data) + source.extra_bytes(),
                                         budget.processes, lane)
            datasets[lane_name(split, lane)] = _dataset(datasource, budget, cfg)
        sizes[split], sources[split] = datasource.largest_epoch(cfg.train.epochs), datasource
    return Datasets(datasets, sizes, handle, sources, source.left_out())


def _dataset(datasource: EpochDatasource, budget: DataBudget, cfg: ThaliaConfig) -> ray.data.Dataset:
    # The read tasks as planned: without override_num_blocks Ray Data splits small reads
    # into one-row blocks to reach its default parallelism (SplitBlocks in the plan).
    # No runtime_env: Ray logs it, and credentials reach workers through their environment.
    ds = ray.data.read_datasource(datasource, num_cpus=budget.task_cpus, override_num_blocks=datasource.num_tasks())
    ds.context.target_max_block_size = block_size_limit(cfg.data, datasource.sample_bytes)
    ds.context.override_object_store_memory_limit_fraction = OBJECT_STORE_FRACTION
    add_execution_callbacks(ds.context, IdleBackoff, ClusterLimits)
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(cpu=budget.cpus)
    options.preserve_order = not datasource.spec.training or cfg.train.deterministic
    return ds


class EpochLanes:
    """Starts the train split's epochs on their lanes. `shard(name)` gives a consumer's iterator of a
    dataset (`ray.train.get_dataset_shard` in Ray Train, a `streaming_split` part elsewhere);
    `start(epoch)` sets the run's epoch and returns its batches, already being fetched (EpochStart)."""

    def __init__(self, handle: EpochHandle, shard: Callable[[str], Any], batch_size: int, prefetch_batches: int,
                 drop_last: bool = False) -> None:
        self.handle, self.shard = handle, shard
        self.options = {"batch_size": batch_size, "prefetch_batches": prefetch_batches, "drop_last": drop_last}

    def start(self, epoch: int) -> EpochStart:
        set_epoch(self.handle, epoch)
        return EpochStart(self.shard(lane_name("train", epoch)).iter_torch_batches(
            collate_fn=TorchCollate(), **self.options))
