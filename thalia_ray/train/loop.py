"""The per-worker training loop that Ray Train runs on every worker.

One `WorkerLoop` per worker: build (seeded model, DDP, AdamW, per-step schedule, precision), restore
from the latest checkpoint when Ray restarts the worker group, then per epoch: train on this
worker's shard of the balanced draw, validate on its shard of the validation split, decide early
stopping the same way on every rank, and report flat metrics with a checkpoint to Ray. Rank 0
alone writes the checkpoint, the store's history, the progress line and the live TensorBoard (see
`tracking`).

Every collective (DDP gradients, metric and loss reductions, the stop decisions) is entered by all
ranks the same number of times: Ray's equal split gives every rank as many rows (so batches),
training stops after at most `steps_per_epoch` steps on all ranks alike, and validation runs the
bare model, whose forward communicates nothing.

A stop request from the driver (`interrupts`: Ctrl-C, SIGTERM) is looked at after every training step
and before every epoch; rank 0 decides for all. An epoch in training is abandoned (nothing of it is
reported); one being validated or checkpointed is finished first. The workers then return, so Ray
Train registers every checkpoint reported before the run ends, and the store's history and Ray's
snapshot agree on the epochs a rerun resumes after.
"""
from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import ray.train
import ray.train.torch
import torch

from thalia_ray.config import ThaliaConfig
from thalia_ray.data.pipeline import EpochLanes, EpochLead, EpochStart, TorchCollate, epoch_traffic, set_eval_epoch
from thalia_ray.interrupts import RemoteStop
from thalia_ray.progress import progress_line
from thalia_ray.runtime import setup_logging
from thalia_ray.train.checkpoint import load_state, to_checkpoint, unwrap
from thalia_ray.train.collectives import all_mean, rank_zero_decides
from thalia_ray.train.evaluate import to_device
from thalia_ray.train.objective import Objective, Supervised
from thalia_ray.train.schedule import anchor, epoch_steps, run_scheduler
from thalia_ray.train.step import build_optimizer, clear_gradients, optimizer_step

log = logging.getLogger(__name__)

# How long an injected fault waits before killing the worker: Ray's controller polls reports about
# every 2 s, and the drill should test a restart from the last checkpoint, not lose it.
FAULT_DELAY_S = 3.0


@dataclass(frozen=True)
class LoopSettings:
    """Everything a worker needs, sent by the driver as `train_loop_config`."""

    cfg: dict[str, Any]  # ThaliaConfig.model_dump(mode="json")
    run_id: str
    steps_per_epoch: int
    epoch_control: Any  # the pipeline's picklable epoch handle
    record: Any = None  # the store's RunRecord (rank 0 writes history); None to skip
    fault: str | None = None  # "rank:epoch:marker-file", a fault-tolerance drill (see `maybe_inject_fault`)
    val_samples: int | None = None  # the validation split's samples, all ranks together (val/n_expected)
    objective: Objective = field(default_factory=Supervised)  # what the run learns (train/objective.py)
    epoch_lines: bool = True  # rank 0 logs each epoch's line (a sweep's driver prints its trials' own)
    stop: RemoteStop | None = None  # the driver's stop request and fault hook (interrupts); None: never asked


@dataclass
class EarlyStopping:
    """Tracks the best value of the monitored metric and the epochs since it last improved."""

    mode: str
    patience: int | None
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is a new best. NaN never improves."""
        improved = not math.isnan(value) and (
            self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        )
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience


@dataclass
class Progress:
    """The loop's own state, saved in every checkpoint next to the model and optimiser."""

    epoch: int = 0  # last completed epoch (1-based)
    restarts: int = 0  # how many times training resumed from a checkpoint
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """Deterministic PyTorch kernels (cuBLAS needs its workspace setting before first use)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def maybe_inject_fault(spec: str | None, rank: int, epoch: int) -> None:
    """Kill this worker process once, at the start of `epoch` on `rank` (spec "rank:epoch:marker").

    The marker file makes the fault fire once: the replacement worker finds it and trains on. This
    lets a test or an operator check that a run survives losing a worker.
    """
    if not spec:
        return
    want_rank, want_epoch, marker = spec.split(":", 2)
    if (rank, epoch) != (int(want_rank), int(want_epoch)) or Path(marker).exists():
        return
    Path(marker).write_text(f"rank {rank} killed at the start of epoch {epoch}\n")
    log.warning("fault drill: rank %d exits at the start of epoch %d", rank, epoch)
    time.sleep(FAULT_DELAY_S)
    os._exit(1)


class WorkerLoop:
    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings
        self.objective = settings.objective
        self.cfg = ThaliaConfig.model_validate(settings.cfg)
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.upcoming: Any = None  # the next epoch's batches, started after this epoch's first
        self.upcoming_val: Any = None  # this epoch's validation batches, started before its training ends
        self.samples = 0  # samples trained and validated this epoch, over all ranks
        # Rank 0 watches the driver's stop request; every rank leaves when rank 0 says so (`_stop_now`).
        self.stop_seen = settings.stop.seen() if settings.stop is not None and self.rank == 0 else threading.Event()
        self.device = ray.train.torch.get_device()
        self.precision = self._precision()
        train = self.cfg.train

        if train.deterministic:
            use_deterministic_kernels()
        seed_everything(self.cfg.seed)  # identical initial weights on every rank
        restored = self._latest_state()
        model = self.objective.build_model(self.cfg, initial_weights=restored is None)
        self.epoch_steps = epoch_steps(train, settings.steps_per_epoch)  # schedule positions per epoch
        self.optimizer_steps = train.epochs * settings.steps_per_epoch
        self.progress = Progress()
        self.stopper = EarlyStopping(train.early_stopping.mode, train.early_stopping.patience)
        if restored is not None:
            model.load_state_dict(restored["model"])
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = build_optimizer(self.model, train)
        self.scheduler = run_scheduler(self.optimizer, train, settings.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.objective.setup(self.cfg, self.device)
        if restored is not None:
            self._restore(restored)
        # From here on each rank (and each resumption) draws its own random stream, e.g. for dropout.
        seed_everything(hash((self.cfg.seed, self.rank, self.progress.epoch)) % 2**31)
        self.tracker = self._start_tracking()
        self.lanes = EpochLanes(settings.epoch_control, ray.train.get_dataset_shard, train.batch_size,
                                self.cfg.data.prefetch_batches, drop_last=True)  # a last batch of one sample breaks batch norm

    # ------------------------------------------------------------------------------ setup
    def _precision(self) -> str:
        wanted = self.cfg.train.precision
        if wanted != "fp32" and self.device.type != "cuda":
            if self.rank == 0:
                log.info("train.precision %s needs a GPU; training in fp32 on %s", wanted, self.device)
            return "fp32"
        return wanted

    def _latest_state(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else load_state(checkpoint)

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.stopper = EarlyStopping(**state["early_stopping"])
        self.progress = Progress(**state["progress"])
        self.progress.restarts += 1
        if self.rank == 0:
            log.info("run %s resumes after epoch %d", self.settings.run_id, self.progress.epoch)

    def _start_tracking(self) -> Any:
        """Rank 0's live TensorBoard, uploading into the run's folder in the store (the other trackers
        are written from the store's records when the run ends: see `tracking`)."""
        if self.rank != 0:
            return None
        from thalia_ray.train.tracking import TRACKING, RunTracker

        record = self.settings.record
        if record is None:
            return RunTracker(self.cfg, self.settings.run_id, None)
        varied = record.read_status().get("sweep_config", {})  # a sweep trial's sampled values
        return RunTracker(self.cfg, self.settings.run_id, record.loc.join(TRACKING), varied)

    # ------------------------------------------------------------------------------ epochs
    def run(self) -> None:
        train = self.cfg.train
        epochs = range(self.progress.epoch + 1, train.epochs + 1)
        if self.stopper.should_stop:  # resumed after early stopping had ended it: nothing is left to train
            epochs = range(0)
        for epoch in epochs:
            if self._stop_now():  # asked to stop before the epoch started: nothing of it is lost
                self._log_stop(f"before epoch {epoch}")
                break
            started = time.perf_counter()
            maybe_inject_fault(self.settings.fault, self.rank, epoch)
            trained = self.train_epoch(epoch)
            if trained is None:  # asked to stop during training: the epoch is abandoned, not reported
                self._log_stop(f"during epoch {epoch}: it is abandoned; the last checkpoint is epoch {epoch - 1}")
                break
            metrics = {"epoch": epoch, **trained, **self.validate()}
            metrics["time/epoch_s"] = time.perf_counter() - started
            metrics["time/samples_per_s"] = self.samples / metrics["time/epoch_s"]  # train + val, all ranks
            if self.rank == 0:  # every reader's storage traffic for this epoch's train and val reads
                metrics.update(epoch_traffic(self.settings.epoch_control, epoch - 1).metrics())
            improved = self.stopper.update(self._monitored(metrics), epoch)
            stop = rank_zero_decides(self.stopper.should_stop, self.device)
            metrics.update({"best_epoch": self.stopper.best_epoch, "restarts": self.progress.restarts})
            self.progress.epoch = epoch
            self.progress.history.append(metrics)
            self.report(metrics, improved)
            if stop:
                if self.rank == 0:
                    log.info("early stopping after epoch %d: %s has not improved for %d epochs",
                             epoch, train.early_stopping.metric, self.stopper.bad_epochs)
                break
        if self.tracker is not None:
            self.tracker.finish()

    def _stop_now(self) -> bool:
        """Whether the driver asked to stop, decided by rank 0 for every rank (one tiny collective with
        several workers), so that all ranks leave at the same step."""
        return rank_zero_decides(self.stop_seen.is_set(), self.device)

    def _log_stop(self, when: str) -> None:
        if self.rank == 0:
            log.warning("run %s: stop requested %s", self.settings.run_id, when)

    def _signal_at(self, point: str, n: int) -> None:
        """The fault hook (`interrupts.SignalAt`): rank 0 signals the driver at `point` of epoch `n`, then
        sees the request at the next check."""
        stop = self.settings.stop
        if stop is not None and stop.signal_at is not None and self.rank == 0 and stop.signal_at.fire(point, n, stop):
            self.stop_seen.set()

    def train_epoch(self, epoch: int) -> dict[str, float] | None:
        """One epoch's training on this rank's shard; None when a stop request ended it early."""
        self.model.train()
        batches, self.upcoming = iter(self.upcoming or self.lanes.start(epoch - 1)), None
        totals: dict[str, float] = {}
        steps, lead = 0, EpochLead(self.settings.steps_per_epoch, time.perf_counter())
        clear_gradients(self.optimizer)  # with train.grad_reset: epoch, the only clearing this epoch
        anchor(self.scheduler, (epoch - 1) * self.epoch_steps)
        for batch in batches:
            if steps == self.settings.steps_per_epoch:
                break
            for name, value in self.train_step(to_device(batch, self.device)).items():
                totals[name] = totals.get(name, 0.0) + value
            steps += 1
            # Ray Data executions started in the background while this epoch streams (pipeline docstring).
            # The next epoch, on the other lane: after the first step, never before it. That step's gradient
            # all-reduce means every rank has left the previous epoch, whose lane the next one reuses.
            if steps == 1 and epoch < self.cfg.train.epochs:
                self.upcoming = self.lanes.start(epoch)  # the pipeline counts epochs from 0: this is epoch + 1
            if self.upcoming_val is None and lead.due(steps, time.perf_counter()):
                self.upcoming_val = EpochStart(self.val_batches(epoch))
            if self.rank == 0:  # the driver's progress bar (fire and forget)
                self.settings.epoch_control.actor().advance.remote(epoch, steps)
            if steps == 1:
                self._signal_at("during-epoch", epoch)
            if self._stop_now():
                batches.close()
                return None
        if steps == 0:
            raise RuntimeError(f"rank {self.rank} got no training batch in epoch {epoch}: the training split is empty")
        if self.upcoming_val is None:  # not due before the last batch
            self.upcoming_val = EpochStart(self.val_batches(epoch))
        batches.close()  # end this epoch's iteration (left early at a step cap) before its lane streams again
        self.samples = steps * self.cfg.train.batch_size * self.world_size
        means = all_mean({name: total / steps for name, total in totals.items()}, self.device)
        return {"train/loss": means.pop("total"), **{f"train/loss_{k}": v for k, v in means.items()},
                "lr": self.scheduler.get_last_lr()[0]}

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        loss, components = self.objective.loss(self.model, batch, self.device, self.precision)
        optimizer_step(loss, self.model, self.optimizer, self.scaler, self.cfg.train)
        self.scheduler.step()
        self.objective.after_step(unwrap(self.model), self.scheduler.last_epoch / self.optimizer_steps)
        return components

    def val_batches(self, epoch: int) -> Any:
        """This rank's validation batches of `epoch` (one execution per validation; started early by train_epoch)."""
        if self.rank == 0:
            set_eval_epoch(self.settings.epoch_control, epoch - 1)  # its reads' storage traffic counts to `epoch`
        return ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=self.cfg.train.batch_size,
            collate_fn=TorchCollate(),
            prefetch_batches=self.cfg.data.prefetch_batches,
        )

    def validate(self) -> dict[str, float]:
        """Validation metrics over all ranks' shards, by the objective, on the bare model (see the module
        docstring), with how many of the split's samples they cover (the equal split, a step cap or skipped
        samples may leave some out)."""
        batches, self.upcoming_val = self.upcoming_val or self.val_batches(self.progress.epoch + 1), None
        metrics, count = self.objective.validate(unwrap(self.model), batches, self.device, self.precision,
                                                 self.cfg.train.max_steps_per_epoch)
        self.samples += count
        expected = {} if self.settings.val_samples is None else {"val/n_expected": self.settings.val_samples}
        return {**metrics, "val/n_evaluated": count, **expected}

    def _monitored(self, metrics: Mapping[str, float]) -> float:
        name = self.cfg.train.early_stopping.metric
        if name not in metrics:
            raise KeyError(
                f"train.early_stopping.metric {name!r} is not reported; available: {', '.join(sorted(metrics))}"
            )
        return float(metrics[name])

    # ------------------------------------------------------------------------------ reporting
    def state(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "early_stopping": asdict(self.stopper),
            "progress": asdict(self.progress),
            **self.objective.checkpoint_extras(unwrap(self.model)),
        }

    def report(self, metrics: dict[str, float], improved: bool) -> None:
        """Report to Ray on every rank; rank 0 attaches the checkpoint and writes the history."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        # Trackers, then history, before the report: a sweep scheduler may stop the run as soon as it sees a
        # report, and Ray Train lets the workers run ahead into the next epoch meanwhile, so the kill can land
        # anywhere. The history is the store's commit of an epoch: written last, an epoch it holds is tracked
        # too (a killed worker's trackers may lead it by the epoch it was cut in). It is written from the
        # checkpointed progress, so a resumed run rewrites it and never doubles an epoch.
        epoch = int(metrics["epoch"])
        self._signal_at("before-checkpoint", epoch)
        if self.tracker is not None:
            self.tracker.log(metrics, step=epoch)
        if self.settings.record is not None:
            self.settings.record.write_history(self.progress.history)
        checkpoint, tmp = to_checkpoint(self.state())
        with tmp:
            self._signal_at("during-checkpoint", epoch)
            ray.train.report(metrics, checkpoint=checkpoint)
        self._signal_at("after-checkpoint", epoch)
        if self.settings.epoch_lines:
            log.info(progress_line(metrics, self.cfg.train.epochs, improved))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` is `{"settings": LoopSettings(...)}`."""
    settings: LoopSettings = config["settings"]
    setup_logging(settings.cfg["runtime"]["log_level"])  # workers forward only warnings otherwise
    if settings.cfg["runtime"]["log_level"] != "DEBUG":
        # Ray Train logs some internals ("Reporting training result ...") through loggers named after their
        # files, below the root logger, which its own log-level setting misses
        logging.getLogger().setLevel(logging.WARNING)
    WorkerLoop(settings).run()
