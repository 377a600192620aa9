"""The Tune driver: one Ray Train run (`fit`) per trial, ASHA on the epoch metric, resumable sweeps.

Under Train V2 a Tune trial is a small driver function that builds and fits its own `TorchTrainer`
(reporting through `TuneReportCallback`); the driver holds a token CPU and the Train workers reserve
their own resources. Each trial's run id is derived from the sweep id and Tune's trial id, so a resumed
trial continues the same Ray Train run (and its checkpoints) instead of starting over.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ray.tune import Callback

from thalia_ray import interrupts
from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.interrupts import Interrupted, RemoteStop
from thalia_ray.metric_names import DEFORMATION, TEST, VAL, key
from thalia_ray.store import ExperimentStore
from thalia_ray.storage import S3Options, resolve
from thalia_ray.store.records import STATUS, StoreError
from thalia_ray.train.trackers import track_outcome
from thalia_ray.tune import space
from thalia_ray.tune.progress import SweepProgress

log = logging.getLogger(__name__)

DRIVER_RESOURCES = {"CPU": 0.01}  # 0 is rejected by Tune; the Train workers reserve the real resources
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


@dataclass
class SweepSummary:
    sweep_id: str
    store: str
    metric: str
    mode: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_run: str | None = None
    best_value: float | None = None
    seconds: float = 0.0
    worker_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    status: str = "finished"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _trial_fn(base_yaml: str, store_url: str, sweep_id: str, stop: RemoteStop) -> Callable[[dict[str, Any]], None]:
    """The per-trial driver. It receives the base config as YAML text so that the closure is plain data.

    A trial obeys the sweep's stop request (`stop`): its run stops at a safe point, then the trial waits
    (parked) for Tune to end the experiment, so that Tune keeps it unfinished and `--resume` runs it again,
    from its run's last checkpoint. A trial started after the request parks at once."""

    def run_trial(sampled: dict[str, Any]) -> None:
        import yaml
        from ray import tune as ray_tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from thalia_ray.train.trainer import fit

        base = ThaliaConfig.model_validate(yaml.safe_load(base_yaml))
        cfg = space.trial_config(base, sampled)
        cfg = cfg.with_overrides({"runtime.wandb.group": sweep_id})
        trial_id = ray_tune.get_context().get_trial_id()
        store = ExperimentStore(resolve(store_url, S3Options.of(cfg.storage)))
        run_id = f"{sweep_id}-{trial_id}"
        finished = _finished_history(store, run_id)
        if finished:  # finished before an interruption that Tune's saved state missed: report, never re-run
            ray_tune.report(finished[-1])
            return
        sweep_config = {k: v for k, v in sampled.items() if not k.startswith("_")}
        try:
            if not stop.enter():
                fit(cfg, store=store, run_id=run_id, callbacks=[TuneReportCallback()],
                    sweep_id=sweep_id, sweep_config=sweep_config, stop=stop)
        except Interrupted:
            pass  # the run recorded how it stopped and how to go on
        finally:
            stop.leave()
        if stop.requested():
            threading.Event().wait()  # parked: Tune ends the experiment (EndOnStop) and this actor with it

    return run_trial


class EndOnStop(Callback):
    """Ends Tune's loop its own way (SIGUSR1: Tune saves the experiment's state, unfinished trials stay
    unfinished) once this process was asked to stop and no trial is in a fit any more. Holds no state that
    outlives a restore: the request and its flag are the current process's (`interrupts.current`)."""

    def __init__(self) -> None:
        self.sent = False

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        stop = interrupts.current()
        if self.sent or not stop.requested or stop.remote().running():
            return
        self.sent = True
        os.kill(os.getpid(), signal.SIGUSR1)


def _finished_history(store: ExperimentStore, run_id: str) -> list[dict[str, Any]]:
    """The metric history of a run that finished with its results stored, else []."""
    record = store.run(run_id)
    if not record.loc.join(STATUS).exists() or record.read_status().get("status") != "finished":
        return []
    return record.read_history() if record.read_results() is not None else []


def resolve_sweep_id(cfg: ThaliaConfig, resume: bool = False, sweep_id: str | None = None) -> str:
    """The id a sweep of `cfg` runs under: `sweep_id` (checked) when given, with `resume` the newest sweep
    of its name (a StoreError when there is none), else a new id. Needs no Ray: the CLI asks first."""
    store = ExperimentStore.of(cfg.storage)
    if sweep_id:
        return store.sweep(sweep_id).sweep_id
    name = (cfg.sweep.name if cfg.sweep else None) or f"{cfg.name}-sweep"
    if resume:
        existing = sorted(n for n in store.sweeps_root.list() if n.startswith(f"{name}-"))
        if not existing:
            raise StoreError(f"--resume: no sweep named {name!r} in {store.sweeps_root}")
        return existing[-1]  # ids embed a UTC timestamp: the last is the newest
    return store.new_run_id(name)


def run_sweep(cfg: ThaliaConfig, *, resume: bool = False, sweep_id: str | None = None) -> SweepSummary:
    """Run (or resume) the sweep described by `cfg.sweep` over the base run configuration `cfg`."""
    from ray import tune

    sweep = cfg.sweep
    if sweep is None:
        raise ConfigError("sweep: this configuration has no sweep section")
    store = ExperimentStore.of(cfg.storage)
    sweep_id = resolve_sweep_id(cfg, resume, sweep_id)
    base_yaml = cfg.model_copy(update={"sweep": None}).to_yaml()
    stop = interrupts.current()
    trainable = tune.with_resources(_trial_fn(base_yaml, store.root.url, sweep_id, stop.remote()), DRIVER_RESOURCES)
    fs, root = store.ray_storage()
    experiment = f"{root.rstrip('/')}/{sweep_id}"
    record = store.sweep(sweep_id)
    started = time.time()

    if resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming sweep %s from %s", sweep_id, experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        record.loc.join("config.yaml").write_text(cfg.to_yaml())
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(sweep),
            tune_config=tune.TuneConfig(
                search_alg=space.search_algorithm(sweep),
                scheduler=space.scheduler(sweep, cfg.train.epochs),
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name=sweep_id, storage_path=root, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=[SweepProgress(sweep.metric, sweep.mode, cfg.train.epochs,
                                                               space.varied_fields(sweep), store, sweep_id),
                                                 EndOnStop()],
                                      verbose=0),  # Tune's status tables off: SweepProgress tells
        )
    record.write_summary({"sweep_id": sweep_id, "status": "running", "store": store.root.url})
    with stop.graceful(f"sweep {sweep_id}"), _tune_leaves_sigint_alone():
        grid = tuner.fit()
    summary = summarise(store, sweep_id, cfg, grid, time.time() - started)
    if stop.requested:
        summary.status = "interrupted"
    record.write_summary(summary.to_json())
    if stop.requested:
        stopped = sum(t["status"] == "interrupted" for t in summary.trials)
        raise interrupts.interrupted(
            f"sweep {sweep_id} interrupted by {stop.requested_signal()}: {stopped} trial(s) stopped at a checkpoint, "
            f"{sum(t['status'] == 'finished' for t in summary.trials)} finished; rerun with --sweep-id {sweep_id} "
            "--resume to go on", stop)
    return summary


@contextlib.contextmanager
def _tune_leaves_sigint_alone() -> Iterator[None]:
    """Tune replaces the SIGINT handler (stopping trials at once) unless told not to; ours stays."""
    previous = os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = previous


def summarise(store: ExperimentStore, sweep_id: str, cfg: ThaliaConfig, grid: Any, seconds: float) -> SweepSummary:
    """Per-trial outcome, read from the run records in the store (the source of truth).

    A trial that ASHA stopped never finishes its own run, so a run still marked running once the sweep
    is over is marked "stopped" here.
    """
    sweep = cfg.sweep
    assert sweep is not None
    summary = SweepSummary(sweep_id, store.root.url, sweep.metric, sweep.mode, seconds=seconds)
    summary.errors = [str(r.error)[:500] for r in grid if r.error]
    summary.status = "failed" if summary.errors else "finished"
    sign = 1.0 if sweep.mode == "max" else -1.0
    for run_id in sorted(s.run_id for s in store.list_runs(sweep=sweep_id)):
        record = store.run(run_id)
        status = record.read_status()
        if status.get("status") == "running":
            record.set_status("stopped", reason="stopped early by the sweep scheduler")
            status = record.read_status()
            track_outcome(store, run_id)  # Ray killed the trial's own driver before it could
        history = record.read_history()
        values = [row[sweep.metric] for row in history if row.get(sweep.metric) is not None]
        best = (max(values) if sweep.mode == "max" else min(values)) if values else None
        workers = record.read_config().train.num_workers
        worker_s = sum(float(row.get("time/epoch_s", 0.0)) for row in history) * workers
        summary.worker_seconds += worker_s
        results = (record.read_results() or {}).get("metrics", {})
        summary.trials.append({
            "run_id": run_id,
            "config": status.get("sweep_config", {}),
            "status": status.get("status"),
            "epochs": len(history),
            "best": best,
            "test": {k: v for k, v in results.items() if k.startswith(key(TEST, "")) and k.endswith(DEFORMATION)},
            "worker_seconds": worker_s,
        })
        if best is not None and (summary.best_value is None or sign * best > sign * summary.best_value):
            summary.best_value, summary.best_run = best, run_id
    return summary


# Short names of the Deformation metrics for terminal tables (`val/f1_deformation` is `val F1`).
SHORT_METRICS = {"f1": "F1", "auroc": "AUROC", "iou": "IoU", "ap": "AP", "ap5": "AP5", "accuracy": "acc",
                 "precision": "precision", "recall": "recall", "loss": "loss"}


def short_metric(name: str) -> str:
    split, _, metric = name.partition("/")
    base = metric.removesuffix(DEFORMATION)
    return f"{split} {SHORT_METRICS.get(base, base)}"


def trials_table(summary: SweepSummary, varied: list[str], test_metrics: tuple[str, ...] = ()) -> str:
    """The sweep's trials in a table that fits a terminal: best validation value first, Tune's trial id,
    the varied values, status, epochs, then the sweep metric's best validation value and the finished
    trials' test values of `test_metrics` (the test split's counterpart of the sweep metric by default),
    all of the Deformation class. `thalia-ray leaderboard SWEEP_ID` has every metric."""
    from thalia_ray.tables import Table, render

    sign = -1.0 if summary.mode == "max" else 1.0
    ranked = sorted(summary.trials, key=lambda t: (t["best"] is None, sign * (t["best"] or 0.0)))
    shown = test_metrics or (summary.metric.replace(key(VAL, ""), key(TEST, ""), 1),)
    header = ["#", "trial", *varied, "status", "epochs", f"best {short_metric(summary.metric)}",
              *(short_metric(m) for m in shown)]
    rows = [[i + 1, t["run_id"].removeprefix(f"{summary.sweep_id}-"), *(t["config"].get(k) for k in varied),
             t["status"], t["epochs"], t["best"], *(t.get("test", {}).get(m) for m in shown)]
            for i, t in enumerate(ranked)]
    title = f"trials of {summary.sweep_id} by their best {summary.metric} ({summary.mode})"
    return render(Table(header, rows, title), "terminal")
