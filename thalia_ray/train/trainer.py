"""Build and run one distributed training run: a Ray `TorchTrainer` over the pipeline's datasets.

`fit` records the run in the experiment store, sizes the schedule from the pipeline's real epoch
sizes, places the workers (fractional CPUs; GPUs when the cluster has them), lets Ray restart the
worker group from the latest checkpoint after a failure, and keeps the best checkpoints by the
early-stopping metric. After training it tests the best checkpoint on the whole test split and
stores results, per-sample predictions and every sample skipped as unreadable (also when the run
fails), and what the index and each epoch left out (`left_out.json`). A Tune trial calls `fit` with
Tune's report callback and its sweep's stop request. What the run learns, and what it keeps at the
end, is its `Objective` (train/objective.py): the benchmark's task by default, pretraining for
`thalia-ray pretrain`.

Ctrl-C and SIGTERM (`interrupts`) stop a run at its workers' next step; `fit` marks it interrupted at
once, and when the workers have returned (every checkpoint they reported is registered with Ray
Train) raises Interrupted with the way to resume. Any driver built on `fit` and `train.loop` (a
pretraining run too) stops the same way.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from ray.train import (Checkpoint, CheckpointConfig, ControllerError, DataConfig, FailureConfig, LoggingConfig, Result,
                       RunConfig, ScalingConfig, WorkerGroupError)
from ray.train.torch import TorchTrainer

from thalia_ray import interrupts, threads
from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data.annotations import LeftOut, describe_left_out
from thalia_ray.data.pipeline import EpochHandle, bad_sample_report, skipped_samples
from thalia_ray.errors import StorageProblem, StoreProblem, ThaliaError, excerpt
from thalia_ray.interrupts import Interrupted, RemoteStop, Stop
from thalia_ray.metric_names import AP, F1, IOU, LOSS, VAL, key
from thalia_ray.ray_internals import TRAIN_SNAPSHOT, latest_checkpoint_dir
from thalia_ray.runtime import raised_in_task
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.storage import StorageError
from thalia_ray.store.records import LEFT_OUT, Lease, RunRecord, Status, shortfalls
from thalia_ray.traffic import Traffic, describe
from thalia_ray.train.checkpoint import CheckpointError, check_state
from thalia_ray.train.evaluate import gpu_wanted
from thalia_ray.train.loop import LoopSettings, train_loop_per_worker
from thalia_ray.train.objective import Objective, Supervised
from thalia_ray.train.trackers import track_outcome

log = logging.getLogger(__name__)

# "rank:epoch:marker-file": kill that worker once at the start of that epoch (a fault-tolerance
# drill; read on the driver and forwarded, since workers do not see the driver's environment).
FAULT_ENV = "THALIA_INJECT_FAULT"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    best_epoch: int | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    checkpoint: str | None  # path of the best checkpoint on the store's filesystem
    store: str  # the experiment store's URL
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0  # unreadable samples skipped in training, validation and test (listed in the store)
    left_out: int = 0  # annotations and series members the index left out (listed in the store)

    def __str__(self) -> str:
        """One readable line: the headline Deformation metrics (a pretraining run: its validation loss),
        skipped samples, the splits whose metrics miss samples (N of M), where the run is, and the run's
        object-storage traffic (requests, retries, throttles) when it read any."""
        metrics = {**self.val_metrics, **self.test_metrics}
        shown = [f"{k} {v:.3f}" for k, v in metrics.items()
                 if k.split("/")[-1] in (F1, AP, IOU)]
        shown = shown or [f"{k} {v:.4f}" for k, v in self.val_metrics.items() if k == key(VAL, LOSS)]
        short = "".join(f", {s}" for s in shortfalls(metrics))
        left_out = f", {self.left_out} left out of the index" if self.left_out else ""
        traffic = Traffic.total(self.history)
        storage = f"; storage: {describe(traffic)}" if traffic else ""
        return (f"run {self.run_id}: best epoch {self.best_epoch}, {', '.join(shown)}, "
                f"{self.skipped} samples skipped{short}{left_out} (store {self.store}){storage}")


def scaling_config(cfg: ThaliaConfig, use_gpu: bool) -> ScalingConfig:
    resources: dict[str, float] = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def run_config(cfg: ThaliaConfig, store: ExperimentStore, run_id: str, callbacks: Iterable[Any] = ()) -> RunConfig:
    """Ray storage under the store; the run id is the Ray run name, so a retried job resumes."""
    filesystem, path = store.ray_storage()
    stopping = cfg.train.early_stopping
    return RunConfig(
        name=run_id,
        storage_path=path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        # Ray Train's own records (worker group starts, every report, a failed worker's traceback) only when
        # debugging; ours pass through. A failure still reaches the driver whole: `fit` raises it, as one line
        # when the user can act on it (user_problem), else with the workers' tracebacks.
        logging_config=LoggingConfig(log_level="DEBUG" if cfg.runtime.log_level == "DEBUG" else "CRITICAL"),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints,
            checkpoint_score_attribute=stopping.metric,
            checkpoint_score_order=stopping.mode,
        ),
        callbacks=list(callbacks),
    )


def steps_per_epoch(cfg: ThaliaConfig, sizes: Mapping[str, int]) -> int:
    """Optimiser steps per epoch on every worker, capped by `train.max_steps_per_epoch`.

    Ray's equal split gives each worker floor(n / workers) rows and the loop drops a last partial
    batch (a batch of one breaks batch norm), so each worker runs floor(rows / batch_size) steps.
    """
    workers, batch = cfg.train.num_workers, cfg.train.batch_size
    if sizes["val"] < workers:
        raise ConfigError(f"the val split of {cfg.data.root!r} has {sizes['val']} samples, fewer than "
                         f"train.num_workers={workers}: every worker needs at least one")
    steps = sizes["train"] // workers // batch
    if steps == 0:
        raise ConfigError(f"the train split of {cfg.data.root!r} has {sizes['train']} samples per epoch: too few "
                         f"for one batch of train.batch_size={batch} on each of train.num_workers={workers}")
    cap = cfg.train.max_steps_per_epoch
    return min(steps, cap) if cap is not None else steps


@dataclass(frozen=True)
class EpochUse:
    """How much of a split one epoch uses: the samples drawn, those trained or validated on, and why the
    rest is left out (Ray's equal split over the workers, the last partial batch, a step cap)."""

    drawn: int
    used: int
    left_out: dict[str, int]

    def describe(self, split: str, verb: str) -> str:
        if not self.left_out:
            return f"{split} {verb} all {self.drawn} samples drawn"
        reasons = ", ".join(f"{reason} ×{n}" for reason, n in self.left_out.items())
        return f"{split} {verb} {self.used} of {self.drawn} samples drawn ({reasons})"


def epoch_use(cfg: ThaliaConfig, sizes: Mapping[str, int], steps: int) -> dict[str, EpochUse]:
    """What one epoch of training and of validation uses of the samples drawn (`sizes`), as the loop runs:
    each worker gets floor(n / workers) rows (Ray's equal split), trains on `steps` full batches (a last
    partial batch is dropped) and validates at most `train.max_steps_per_epoch` batches."""
    workers, batch, cap = cfg.train.num_workers, cfg.train.batch_size, cfg.train.max_steps_per_epoch
    split_reason = f"Ray's equal split over {workers} workers"
    cap_reason = f"train.max_steps_per_epoch={cap}"

    def use(drawn: int, per_worker_used: int, per_worker_full: int, partial: str) -> EpochUse:
        per_worker = drawn // workers
        reasons = {split_reason: drawn - per_worker * workers, partial: (per_worker - per_worker_full) * workers,
                   cap_reason: (per_worker_full - per_worker_used) * workers}
        return EpochUse(drawn, per_worker_used * workers, {k: n for k, n in reasons.items() if n > 0})

    train_rows, val_rows = sizes["train"] // workers, sizes["val"] // workers
    full = train_rows // batch * batch
    val_used = min(val_rows, cap * batch) if cap is not None else val_rows
    return {"train": use(sizes["train"], steps * batch, full, f"the last partial batch of {batch}"),
            "val": use(sizes["val"], val_used, val_rows, "")}


def best_reported_checkpoint(result: Result, metric: str, mode: str) -> tuple[Checkpoint, dict[str, Any]]:
    """The kept checkpoint with the best finite `metric`; the latest one when none has a finite value."""
    scored = [(c, m) for c, m in result.best_checkpoints or [] if _finite(m.get(metric))]
    if not scored:
        if result.checkpoint is None:
            raise RuntimeError(f"run {result.path} reported no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    pick = min if mode == "min" else max
    return pick(scored, key=lambda pair: float(pair[1][metric]))


@contextlib.contextmanager
def progress_bar(handle: Any, epochs: int, steps: int) -> Iterator[None]:
    """On a terminal, a tqdm bar of rank 0's training steps (polled from the epoch-control actor)."""
    if not sys.stderr.isatty():
        yield
        return
    import ray
    from tqdm import tqdm

    bar = tqdm(total=epochs * steps, unit="step", leave=False, dynamic_ncols=True)

    def poll(done: threading.Event) -> None:
        while not done.wait(0.5):
            try:
                epoch, step = ray.get(handle.actor().get_progress.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - a missed update only delays the bar
                continue
            bar.n = max(0, (epoch - 1) * steps + step)
            bar.set_description(f"epoch {max(epoch, 1)}/{epochs}", refresh=True)

    try:
        with threads.background(poll, "thalia-progress"):
            yield
    finally:
        bar.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fit(
    cfg: ThaliaConfig,
    *,
    store: ExperimentStore | None = None,
    run_id: str | None = None,
    callbacks: Iterable[Any] = (),
    sweep_id: str | None = None,
    sweep_config: dict[str, Any] | None = None,
    lease: Lease | None = None,
    objective: Objective | None = None,
    stop: Stop | RemoteStop | None = None,
) -> TrainResult:
    """Train `cfg` on the connected Ray cluster and record the run; see the module docstring.

    A sweep trial passes its sweep id and sampled values, so the store knows which trial a run is.
    `lease`: a lease the caller took already (the CLI does, before it starts Ray); the run is then the
    lease's, and releasing it is the caller's. `objective`: what the run learns (default: `Supervised`,
    the benchmark's task; `thalia_ray.pretrain` passes pretraining's). `stop`: the stop request the run
    obeys (`interrupts`): by default this process's, which the CLI's signal handling sets; a Tune trial
    passes its sweep's.
    """
    objective = objective or Supervised()
    stop = stop or interrupts.current()
    store = store or ExperimentStore.of(cfg.storage)
    own_lease = lease is None
    if lease is None:  # one writer per run id: a live one refuses, a stale one is taken over
        lease = store.run(run_id or store.new_run_id(cfg.name)).acquire()
    record = lease.record
    try:
        record.write_config(cfg)
        trial = {"kind": "sweep-trial", "sweep": sweep_id, "sweep_config": sweep_config or {}} if sweep_id \
            else {"kind": objective.kind}
        record.set_status("running", name=cfg.name, **objective.describe(cfg), **trial)
        try:
            with stop.graceful(f"run {record.run_id}"), stop.watch(lambda reason: _record_end(
                    record, "interrupted", f"{reason}: stopping at the next step (an epoch in training is abandoned, "
                                           "one being validated or checkpointed is finished)")):
                outcome = _fit(cfg, store, record, callbacks, lease, objective, stop, epoch_lines=sweep_id is None)
        except Interrupted as err:  # a stop at a safe point, or a second signal that stopped at once
            message = f"{err}: {_resume_hint(record)}"
            _record_end(record, "interrupted", message)
            track_outcome(store, record.run_id)
            raise Interrupted(message, err.exit_code - 128) from None
        except KeyboardInterrupt:
            _record_end(record, "interrupted", "interrupted by the user")
            track_outcome(store, record.run_id)
            raise
        except Exception as err:
            _record_end(record, "failed", f"{type(err).__name__}: {err}")
            track_outcome(store, record.run_id)
            problem = user_problem(err, record)
            if problem is None:
                raise
            raise problem from err
        record.set_status("finished")
        track_outcome(store, record.run_id)
    finally:
        if own_lease:
            lease.release()
    return outcome


def _causes(err: BaseException) -> Iterator[BaseException]:
    """The exceptions behind a failed run: each worker's (Ray Train reports them together) or the
    controller's, then what each was raised from."""
    if isinstance(err, WorkerGroupError):
        roots: list[BaseException] = list(err.worker_failures.values())
    elif isinstance(err, ControllerError):
        roots = [err.controller_failure]
    else:
        roots = [err]
    seen: set[int] = set()
    for cause in roots:
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            cause = raised_in_task(cause)  # a read task's error reaches a worker through Ray Data's actors
            yield cause
            cause = cause.__cause__ or cause.__context__


def user_problem(err: BaseException, record: RunRecord) -> ThaliaError | None:
    """A failure the user can act on, raised in a worker or by the disk (full, unwritable, gone), as one
    error of its kind that says where and how to go on; None when `err` is already one, or is not the
    user's to fix."""
    if isinstance(err, ThaliaError):
        return None
    resume = (f"the run's records and checkpoints are in {record.loc.url}: rerun with --run-id {record.run_id} "
              "to go on from its last checkpoint")
    for cause in _causes(err):
        if isinstance(cause, ThaliaError):
            kind = next(c for c in type(cause).__mro__  # the family member that gives the exit status
                        if c.__module__ == ThaliaError.__module__ and "exit_code" in vars(c))
            return kind(f"run {record.run_id} stopped: {cause} ({resume})")
        if isinstance(cause, OSError):
            return StorageProblem(f"run {record.run_id} stopped on an I/O error: {cause} ({resume} once it is fixed)")
    return None


def _resume_hint(record: RunRecord) -> str:
    """How to go on: the epochs the store holds (each checkpointed, and registered with Ray Train when the run
    stopped at a safe point) and the command."""
    try:
        done = len(record.read_history())
    except (StorageError, StoreProblem, OSError):
        done = 0
    saved = (f"epochs 1-{done} are checkpointed" if done > 1 else "epoch 1 is checkpointed" if done
             else "no epoch was completed")
    return (f"{saved}; rerun the same command with --run-id {record.run_id} to resume"
            + (f" from epoch {done + 1}" if done else ""))


def _record_end(record: RunRecord, status: Status, error: str) -> None:
    """Record how a run ended; if the store cannot take it (gone, full), the next command that meets
    the run's stale `running` record marks it interrupted."""
    try:
        record.set_status(status, error=error)
    except (StorageError, OSError) as err:
        log.error("run %s: cannot record its status %r (%s); the next command that meets it marks it "
                  "interrupted", record.run_id, status, err)


def _stop_if_requested(stop: Stop | RemoteStop, message: str) -> None:
    """Raise Interrupted (`message`, with `{signal}` filled in) when a stop was requested."""
    name = stop.requested_signal()
    if name:
        raise interrupts.interrupted(message.format(signal=name), stop)


def _keep_skipped(record: RunRecord, handle: EpochHandle) -> None:
    """A failing run's skipped samples so far, best effort: the failure is what gets reported."""
    try:
        record.write_skipped(skipped_samples(bad_sample_report(handle)))
    except Exception as err:  # noqa: BLE001 - Ray or the store may be what failed
        log.warning("run %s: cannot record its skipped samples: %s", record.run_id, err)


def record_left_out(record: RunRecord, index: list[LeftOut], epochs: Mapping[str, EpochUse]) -> None:
    """Say what the run leaves out, and record it beside the run: what the index dropped (a warning: the
    data are not what they should be) and what each epoch uses of the samples drawn."""
    if index:
        log.warning("run %s: %s (all in %s)", record.run_id, describe_left_out(index), record.loc.join(LEFT_OUT))
    verbs = {"train": "trains on", "val": "validates"}
    log.info("run %s: each epoch %s", record.run_id, "; ".join(use.describe(split, verbs[split])
                                                                for split, use in epochs.items()))
    record.write_left_out([item.row() for item in index], {split: asdict(use) for split, use in epochs.items()})


def check_ray_snapshot(store: ExperimentStore, run_id: str) -> None:
    """Refuse to resume from a Ray snapshot that cannot be read back, or from a latest checkpoint that is
    damaged or hostile (`checkpoint.check_state`), naming the file and the way on.

    Ray's controller would fail on the snapshot deep inside its own start, and every worker on the
    checkpoint. Ours are written whole (`atomic_arrow`); one left by an older version on a full disk, or
    by another tool, may not be.
    """
    snapshot = store.ray_root.join(run_id, TRAIN_SNAPSHOT)
    if not snapshot.exists():
        return
    start_over = "delete that file to train the run from its start, or use another --run-id"
    try:
        latest = latest_checkpoint_dir(snapshot.read_text())
    except ValueError as err:
        raise StoreProblem(f"run {run_id} cannot resume: Ray's list of its checkpoints, {snapshot.url}, is damaged "
                           f"({excerpt(str(err))}). The checkpoints are beside it; {start_over}") from None
    if latest is not None:
        filesystem, root = store.ray_storage()
        try:
            check_state(Checkpoint(f"{root}/{run_id}/{latest}", filesystem=filesystem))
        except CheckpointError as err:
            raise CheckpointError(f"run {run_id} cannot resume from its latest checkpoint: {err}") from None


def _fit(cfg: ThaliaConfig, store: ExperimentStore, record: RunRecord, callbacks: Iterable[Any],
         lease: Lease, objective: Objective, stop: Stop | RemoteStop, epoch_lines: bool = True) -> TrainResult:
    run_id = record.run_id
    check_ray_snapshot(store, run_id)
    _stop_if_requested(stop, f"run {run_id} interrupted by {{signal}} before training started")
    objective = objective.prepare(cfg)
    data = objective.datasets(cfg, run_id, trainer_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker)
    use_gpu = gpu_wanted(cfg)
    settings = LoopSettings(
        cfg=cfg.model_dump(mode="json"),
        run_id=run_id,
        steps_per_epoch=steps_per_epoch(cfg, data.sizes),
        epoch_control=data.epoch_control,
        record=record,
        fault=os.environ.get(FAULT_ENV),
        val_samples=data.sizes["val"],
        objective=objective,
        epoch_lines=epoch_lines,
        stop=stop.remote(),
    )
    log.info("run %s: %d workers (%s), %d steps per epoch, up to %d samples per training epoch",
             run_id, cfg.train.num_workers, "GPU" if use_gpu else "CPU", settings.steps_per_epoch, data.sizes["train"])
    record_left_out(record, data.left_out, epoch_use(cfg, data.sizes, settings.steps_per_epoch))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=run_config(cfg, store, run_id, callbacks),
        datasets=data.datasets,
        # Ray Train replaces each dataset's execution options with the driver's defaults unless it is
        # given them: pass ours (order, Data's CPU cap) per dataset.
        dataset_config=DataConfig(datasets_to_split=list(data.datasets), execution_options={
            name: ds.context.execution_options for name, ds in data.datasets.items()}),
    )
    try:
        with progress_bar(data.epoch_control, cfg.train.epochs, settings.steps_per_epoch):
            result = stop.run_aside(trainer.fit, f"thalia-fit-{run_id}")
        # Workers asked to stop leave at their next step and return: Ray Train registered every checkpoint.
        done = len(record.read_history())
        _stop_if_requested(stop, f"run {run_id} interrupted by {{signal}} after epoch {done} of {cfg.train.epochs}")
        stopping = cfg.train.early_stopping
        checkpoint, best = best_reported_checkpoint(result, stopping.metric, stopping.mode)
        conclusion = objective.conclude(cfg, checkpoint, use_gpu)
    except Exception:
        _keep_skipped(record, data.epoch_control)
        raise
    val_metrics = {k: v for k, v in best.items() if k.startswith("val/")}
    test_metrics = conclusion.metrics
    best_epoch = int(best["epoch"]) if "epoch" in best else None
    lease.check()
    for split, rows in conclusion.predictions.items():
        record.write_predictions(split, rows)
    for name, content in conclusion.files.items():
        record.loc.join(name).write_bytes(content)
    skipped = record.write_skipped([*skipped_samples(bad_sample_report(data.epoch_control)), *conclusion.skipped])
    history = record.read_history()
    record.write_results({**val_metrics, **test_metrics}, best_epoch=best_epoch, best_checkpoint=checkpoint.path,
                         epochs=int(result.metrics["epoch"]), restarts=int(result.metrics.get("restarts", 0)),
                         storage=asdict(Traffic.total(history)))
    log.info("run %s finished: best epoch %s, %s", run_id, best_epoch,
             ", ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "deformation" in k and "f1" in k))
    return TrainResult(run_id, best_epoch, val_metrics, test_metrics, checkpoint.path, store.root.url, history,
                       skipped, len(data.left_out))
