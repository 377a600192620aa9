"""Run and sweep records: small JSON/YAML files under one folder per run, written atomically.

A run folder holds `config.yaml` (the resolved config: enough to reproduce the run), `run.json`
(status and identity), `history.json` (one metric dict per epoch), `results.json` (final metrics,
best epoch and checkpoint), `predictions/{split}.json` (per-sample outputs for breakdowns),
`skipped.json` (every sample its training or a later `evaluate` could not read, and why) and, while a
driver writes the run, `lease.json` (who, where, last heartbeat): one run id has one writer.
Only plain JSON and YAML: anything can read them, nothing needs unpickling.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar, get_args

from thalia_ray import safe_yaml
from thalia_ray.config import ConfigError, ThaliaConfig, upgrade_stored, validate
from thalia_ray.data import schema
from thalia_ray.errors import StoreError, excerpt
from thalia_ray.metric_names import F1, IOU, LOSS, TEST, VAL, key
from thalia_ray.runtime import describe_machine
from thalia_ray.storage import Location, StorageError
from thalia_ray.tables import Table, render
from thalia_ray.traffic import DEFAULT_REQUEST_PRICE, history_lines

Status = Literal["running", "finished", "failed", "stopped", "interrupted"]
Kind = Literal["train", "sweep-trial", "pretrain", "evaluate", "bench"]
STATUSES: tuple[str, ...] = get_args(Status)
KINDS: tuple[str, ...] = get_args(Kind)
SPLITS = tuple(schema.SPLITS)
PREDICTION_FIELDS = ("key", "frame_id", "intensity", "activity_type", "label", "score", "pred")
SKIPPED_FIELDS = ("epoch", "split", "origin", "key", "reason")
# Which command read (and skipped) a sample: each replaces only its own rows of skipped.json.
SkipCommand = Literal["train", "evaluate"]
SKIP_COMMANDS: tuple[str, ...] = get_args(SkipCommand)
# The first of these found in a run's results (then its last epoch) is shown in listings.
HEADLINE_METRICS = (key(TEST, F1), key(VAL, F1), key(TEST, IOU), key(VAL, IOU), key(VAL, LOSS))

CONFIG, STATUS, HISTORY, RESULTS, PREDICTIONS, SUMMARY, LEASE = (
    "config.yaml", "run.json", "history.json", "results.json", "predictions", "summary.json", "lease.json")
WHOLE_FRAME = "whole_frame.json"  # written by `thalia-ray predict` where annotations exist
RECONSTRUCTIONS = "reconstructions.npz"  # a pretraining MAE's held-out reconstructions (arrays, no pickles)
SKIPPED = "skipped.json"
LEFT_OUT = "left_out.json"  # what the run's index and epochs left out, and why (`write_left_out`)
# A driver renews its lease this often; one silent for STALE_AFTER_S (or dead, on this machine) has lost it.
HEARTBEAT_S = 10.0
SHOWN_SKIPPED = 10  # `runs show` lists this many skipped samples; the rest are in skipped.json
STALE_AFTER_S = 120.0

log = logging.getLogger(__name__)


T = TypeVar("T")


class RunBusyError(StoreError):
    """Another live driver holds the run's lease."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any, where: str) -> Any:
    """Plain JSON types from numpy/torch scalars and nested containers; anything else is an error."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # numpy and torch scalars (0-d arrays and tensors too)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return jsonable(item(), where)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return jsonable(tolist(), where)
    raise StoreError(f"{where}: {type(value).__name__} cannot be stored as JSON")


def parse_config(loc: Location, text: str) -> ThaliaConfig:
    """A stored `config.yaml`, validated; a StoreError naming the file when it is not usable."""
    try:
        return validate(upgrade_stored(safe_yaml.load(text) or {}))
    except (safe_yaml.YamlError, ConfigError) as err:
        raise StoreError(f"{loc}: not a usable configuration: {err}") from None


def read_record(loc: Location, kind: type[dict] | type[list]) -> Any:
    """A JSON record (an object or a list, as `kind` says). A damaged one (cut short, overwritten, not
    ours) is a StoreError naming the file, so that listings can show the run as unreadable."""
    raw = loc.read_bytes()
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreError(f"{loc}: damaged record, not valid JSON ({excerpt(str(err))}); "
                         "move it aside or delete the run's folder") from None
    if not isinstance(value, kind):
        wanted = "object" if kind is dict else "list"
        raise StoreError(f"{loc}: damaged record: expected a JSON {wanted}, got {type(value).__name__}; "
                         "move it aside or delete the run's folder")
    return value


@dataclass(frozen=True)
class RunSummary:
    """One line of `thalia-ray runs`."""

    run_id: str
    name: str
    status: str
    kind: str
    task: str | None
    model: str | None
    sweep: str | None
    metric: str | None
    value: float | None
    created: str | None
    updated: str | None


def headline(results: Mapping[str, Any] | None, history: list[dict[str, Any]],
             preferred: Iterable[str] = HEADLINE_METRICS) -> tuple[str | None, float | None]:
    """The metric a listing shows: from the final results when there are some, else the last epoch."""
    sources = [(results or {}).get("metrics", {}), history[-1] if history else {}]
    for source in sources:
        for name in preferred:
            if isinstance(source.get(name), (int, float)):
                return name, float(source[name])
    return None, None


def evaluated(metrics: Mapping[str, Any], split: str) -> tuple[int, int] | None:
    """(n_evaluated, n_expected) of a split's metrics (`{split}/n_evaluated`, `{split}/n_expected`): how many
    of the split's samples its metrics cover; None when they were not recorded (runs from before them)."""
    done, expected = metrics.get(f"{split}/n_evaluated"), metrics.get(f"{split}/n_expected")
    if not isinstance(done, (int, float)) or not isinstance(expected, (int, float)):
        return None
    return int(done), int(expected)


def shortfalls(metrics: Mapping[str, Any], splits: Iterable[str] = ("val", "test")) -> list[str]:
    """`"{split} metrics over N of M samples"` for each split whose metrics miss samples (skipped as
    unreadable, or left out by Ray's equal split or a step cap), for summary lines; [] when none does."""
    out = []
    for split in splits:
        counts = evaluated(metrics, split)
        if counts is not None and counts[0] < counts[1]:
            out.append(f"{split} metrics over {counts[0]} of {counts[1]} samples")
    return out


# ------------------------------------------------------------------------------------- leases
_ACTIVE: set[str] = set()  # owners of the leases this process holds now


def _process_start(pid: int) -> str | None:
    """When `pid` started (Linux clock ticks since boot), so a reused pid is not taken for the driver."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    if started is not None:
        return _process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who writes a run: a driver process, and when it last said it was alive (`time.time()`)."""

    owner: str
    host: str
    pid: int
    pid_start: str | None
    heartbeat: float

    @classmethod
    def this_process(cls, owner: str) -> "Holder":
        return cls(owner, socket.gethostname(), os.getpid(), _process_start(os.getpid()), time.time())

    def describe(self, now: float) -> str:
        return f"pid {self.pid} on {self.host}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"

    def stale(self, now: float, stale_after: float) -> bool:
        """Gone: a dead process on this machine at once (this very process if it no longer holds the
        lease), anywhere else once its heartbeat is older than `stale_after` seconds."""
        if self.host == socket.gethostname():
            if self.pid == os.getpid():
                return self.owner not in _ACTIVE
            if not _alive(self.pid, self.pid_start):
                return True
        return now - self.heartbeat > stale_after


class Lease:
    """This driver's hold on a run id, renewed every HEARTBEAT_S by a daemon thread until `release`."""

    def __init__(self, record: "RunRecord", holder: Holder, interval: float = HEARTBEAT_S) -> None:
        self.record, self.holder, self.interval = record, holder, interval
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {record.run_id}", daemon=True)
        _ACTIVE.add(holder.owner)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except (StorageError, OSError) as err:  # the store is away: try again at the next beat
                log.warning("run %s: cannot renew its lease: %s", self.record.run_id, err)
            if self.lost_to is not None:
                return

    def renew(self) -> None:
        current = self.record.read_lease()
        if current is not None and current.owner != self.holder.owner:
            self.lost_to = current
            log.error("run %s: another driver took it over (%s); this one's results will not be written",
                      self.record.run_id, current.describe(time.time()))
            return
        self.holder = Holder(**{**asdict(self.holder), "heartbeat": time.time()})
        self.record.write_lease(self.holder)

    def check(self) -> None:
        """Refuse to write outcomes once another driver holds the run."""
        if self.lost_to is not None:
            raise RunBusyError(f"run {self.record.run_id} was taken over by another driver "
                               f"({self.lost_to.describe(time.time())}); this driver's results are not written")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (best effort: a stale one lapses anyway)."""
        self._stop.set()
        self._thread.join()
        _ACTIVE.discard(self.holder.owner)
        try:
            current = self.record.read_lease()
            if current is not None and current.owner == self.holder.owner:
                self.record.loc.join(LEASE).remove()
        except (StorageError, OSError) as err:
            log.warning("run %s: cannot remove its lease (it lapses by itself): %s", self.record.run_id, err)


@dataclass(frozen=True)
class RunRecord:
    """The files of one run, under `loc` (`{store}/runs/{run_id}`)."""

    loc: Location

    @property
    def run_id(self) -> str:
        return self.loc.name

    def exists(self) -> bool:
        return self.loc.join(STATUS).exists() or self.loc.join(CONFIG).exists()

    # ------------------------------------------------------------------------------ config
    def write_config(self, cfg: ThaliaConfig) -> None:
        self.loc.join(CONFIG).write_text(cfg.to_yaml())

    def read_config(self) -> ThaliaConfig:
        loc = self.loc.join(CONFIG)
        return parse_config(loc, self._read(loc, lambda: loc.read_text()))

    # ------------------------------------------------------------------------------ status
    def set_status(self, status: Status, **fields: Any) -> dict[str, Any]:
        """Create or update `run.json`. Known fields: kind, name, sweep, model, task, host, error.

        A new record describes the machine it was created on unless `host` is given.

        A finished run stays finished; `error` is kept only while the run is failed, stopped or interrupted.
        """
        if status not in STATUSES:
            raise StoreError(f"run {self.run_id}: status {status!r} is not one of {STATUSES}")
        kind = fields.get("kind")
        if kind is not None and kind not in KINDS:
            raise StoreError(f"run {self.run_id}: kind {kind!r} is not one of {KINDS}")
        loc = self.loc.join(STATUS)
        record: dict[str, Any] = read_record(loc, dict) if loc.exists() else {}
        if record.get("status") == "finished" and status != "finished":
            raise StoreError(f"run {self.run_id} is already finished; it cannot become {status!r}")
        now = utc_now()
        if not record:
            record = {"run_id": self.run_id, "name": self.run_id, "kind": "train", "created": now,
                      "host": describe_machine()}
        if status in ("running", "finished"):
            record.pop("error", None)
        record.update(jsonable(fields, f"run {self.run_id}"), status=status, updated=now)
        loc.write_json(record)
        return record

    def read_status(self) -> dict[str, Any]:
        loc = self.loc.join(STATUS)
        return self._read(loc, lambda: read_record(loc, dict))

    # ------------------------------------------------------------------------------ lease
    def read_lease(self) -> Holder | None:
        """The driver holding this run, or None; an unreadable lease counts as none."""
        loc = self.loc.join(LEASE)
        try:
            return Holder(**loc.read_json())
        except FileNotFoundError:
            return None
        except (StorageError, TypeError) as err:
            if isinstance(err, StorageError) and "not valid JSON" not in str(err):
                raise
            log.warning("run %s: ignoring an unreadable lease (%s)", self.run_id, err)
            return None

    def write_lease(self, holder: Holder) -> None:
        self.loc.join(LEASE).write_json(asdict(holder))

    def acquire(self, stale_after: float = STALE_AFTER_S, settle_s: float = 1.0) -> Lease:
        """Become the run's only writer, or raise RunBusyError naming the live one.

        A stale lease is taken over (its `running` record is marked interrupted first). Two drivers
        starting together both write a lease; after `settle_s` only the one whose lease is still there
        goes on, and a driver that later finds another lease in place stops writing outcomes.
        """
        now = time.time()
        current = self.read_lease()
        if current is not None and not current.stale(now, stale_after):
            raise RunBusyError(
                f"run {self.run_id} is already being written by {current.describe(now)}: give this run "
                f"another --run-id, or wait for that one to end (a lease left by a crashed driver on another "
                f"machine lapses {stale_after:.0f} s after its last heartbeat)")
        self.reconcile(stale_after)
        mine = Holder.this_process(uuid.uuid4().hex)
        self.write_lease(mine)
        time.sleep(settle_s)
        winner = self.read_lease()
        if winner is None or winner.owner != mine.owner:
            raise RunBusyError(f"run {self.run_id} was claimed at the same moment by "
                               f"{winner.describe(time.time()) if winner else 'another driver'}")
        return Lease(self, mine)

    def reconcile(self, stale_after: float = STALE_AFTER_S) -> dict[str, Any] | None:
        """Mark a `running` record whose driver is gone as interrupted; returns the new record, if any."""
        loc = self.loc.join(STATUS)
        if not loc.exists():
            return None
        if read_record(loc, dict).get("status") != "running":
            return None
        now = time.time()
        holder = self.read_lease()
        if holder is not None and not holder.stale(now, stale_after):
            return None
        who = f"its driver ({holder.describe(now)})" if holder else "its driver"
        return self.set_status("interrupted", error=(
            f"{who} stopped without recording an outcome: killed, or it lost its store or disk; "
            "rerun with the same --run-id to resume from its last checkpoint"))

    # ------------------------------------------------------------------------------ history
    def append_history(self, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Add one epoch's metrics; the whole file is rewritten atomically (fine for hundreds of epochs)."""
        history = self.read_history()
        history.append(jsonable(dict(metrics), f"run {self.run_id} history[{len(history)}]"))
        self.loc.join(HISTORY).write_json(history, indent=None)
        return history

    def write_history(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Replace the whole history (a resumed run rewrites it from its checkpoint), atomically."""
        rows = [jsonable(dict(m), f"run {self.run_id} history[{i}]") for i, m in enumerate(entries)]
        self.loc.join(HISTORY).write_json(rows, indent=None)

    def read_history(self) -> list[dict[str, Any]]:
        """Per-epoch metrics; empty before the first epoch."""
        loc = self.loc.join(HISTORY)
        if not loc.exists():
            return []
        history = read_record(loc, list)
        if not all(isinstance(row, dict) for row in history):
            raise StoreError(f"{loc}: damaged record: expected a list of per-epoch metrics (objects)")
        return history

    # ------------------------------------------------------------------------------ results
    def write_results(self, metrics: Mapping[str, Any], *, best_epoch: int | None = None,
                      best_checkpoint: str | None = None, **extra: Any) -> None:
        """Final metrics (`val/...`, `test/...`) with the epoch and checkpoint they came from."""
        results = {"metrics": dict(metrics), "best_epoch": best_epoch, "best_checkpoint": best_checkpoint, **extra}
        self.loc.join(RESULTS).write_json(jsonable(results, f"run {self.run_id} results"))

    def read_results(self) -> dict[str, Any] | None:
        """Final results, or None while the run has none (still running, or failed)."""
        loc = self.loc.join(RESULTS)
        return read_record(loc, dict) if loc.exists() else None

    # ------------------------------------------------------------------------------ predictions
    def write_predictions(self, split: str, rows: Iterable[Mapping[str, Any]]) -> int:
        """Per-sample predictions of one split; every row needs PREDICTION_FIELDS. Returns the row count."""
        self._check_split(split)
        checked = []
        for i, row in enumerate(rows):
            missing = [f for f in PREDICTION_FIELDS if f not in row]
            if missing:
                raise StoreError(f"run {self.run_id} predictions[{split}] row {i}: missing {missing}")
            checked.append(jsonable(row, f"run {self.run_id} predictions[{split}][{i}]"))
        self.loc.join(PREDICTIONS, f"{split}.json").write_json(checked, indent=None)
        return len(checked)

    def read_predictions(self, split: str) -> list[dict[str, Any]]:
        self._check_split(split)
        loc = self.loc.join(PREDICTIONS, f"{split}.json")
        if not loc.exists():
            have = [n.removesuffix(".json") for n in self.loc.join(PREDICTIONS).list()]
            raise StoreError(f"run {self.run_id} has no {split} predictions (it has: {have or 'none'})")
        return read_record(loc, list)

    # ------------------------------------------------------------------------------ skipped samples
    def write_skipped(self, rows: Iterable[Mapping[str, Any]], command: SkipCommand = "train",
                      splits: Iterable[str] = SPLITS) -> int:
        """The samples `command` skipped as unreadable in `splits`, one row of SKIPPED_FIELDS each (an
        empty list says none was). Returns the row count.

        One file holds every command's rows, each marked with its `command`: these replace that
        command's earlier rows of the same splits (a resumed run, a re-evaluation) and keep the rest,
        so `evaluate` never overwrites what training recorded. The whole file is rewritten atomically.
        """
        if command not in SKIP_COMMANDS:
            raise StoreError(f"run {self.run_id}: skipped-sample command {command!r} is not one of {SKIP_COMMANDS}")
        splits = tuple(splits)
        for split in splits:
            self._check_split(split)
        checked = []
        for i, row in enumerate(rows):
            missing = [f for f in SKIPPED_FIELDS if f not in row]
            if missing:
                raise StoreError(f"run {self.run_id} skipped[{i}]: missing {missing}")
            if row["split"] not in splits:
                raise StoreError(f"run {self.run_id} skipped[{i}]: split {row['split']!r} is not one of {splits}")
            checked.append(jsonable({"command": command, **{f: row[f] for f in SKIPPED_FIELDS}},
                                    f"run {self.run_id} skipped[{i}]"))
        kept = [r for r in self.read_skipped() or [] if not (r["command"] == command and r.get("split") in splits)]
        self.loc.join(SKIPPED).write_json(sorted([*kept, *checked], key=_skip_order))
        return len(checked)

    def read_skipped(self) -> list[dict[str, Any]] | None:
        """The skipped samples, or None when the run recorded none (still running, or older runs).

        Rows of records written before `command` existed were all training's."""
        loc = self.loc.join(SKIPPED)
        if not loc.exists():
            return None
        rows = read_record(loc, list)
        if not all(isinstance(r, dict) for r in rows):
            raise StoreError(f"{loc}: damaged record: expected a list of skipped samples (objects)")
        return [{"command": "train", **r} for r in rows]

    # ------------------------------------------------------------------------------ left out
    def write_left_out(self, index: Iterable[Mapping[str, Any]], epochs: Mapping[str, Any]) -> None:
        """What training left out: `index`, the annotations and series members its index dropped (one row
        each: what, key, reason, frame_id, split, positive), and `epochs`, per split the samples drawn per
        epoch, those used, and how many were left out for which reason (Ray's equal split, a step cap)."""
        self.loc.join(LEFT_OUT).write_json(jsonable({"index": list(index), "epochs": dict(epochs)},
                                                    f"run {self.run_id} left out"))

    def read_left_out(self) -> dict[str, Any] | None:
        loc = self.loc.join(LEFT_OUT)
        return read_record(loc, dict) if loc.exists() else None

    # ------------------------------------------------------------------------------ whole frames
    def write_whole_frame(self, evaluation: Mapping[str, Any]) -> None:
        """The latest whole-frame evaluation of `thalia-ray predict` (AP, F1 per frame and overall)."""
        self.loc.join(WHOLE_FRAME).write_json(jsonable(dict(evaluation), f"run {self.run_id} whole-frame evaluation"))

    def read_whole_frame(self) -> dict[str, Any] | None:
        loc = self.loc.join(WHOLE_FRAME)
        return read_record(loc, dict) if loc.exists() else None

    def request_price(self) -> float:
        """The run's `storage.request_price_per_1000` (the default where its config cannot be read)."""
        try:
            return float(self.read_config().storage.request_price_per_1000)
        except Exception:  # noqa: BLE001 - a missing or older config prices at the default
            return DEFAULT_REQUEST_PRICE

    # ------------------------------------------------------------------------------ summary
    def summary(self) -> RunSummary:
        """Identity, status and headline metric, for listings."""
        info = self.read_status() if self.loc.join(STATUS).exists() else {"status": "unknown"}
        metric, value = headline(self.read_results(), self.read_history())
        return RunSummary(
            run_id=self.run_id, name=info.get("name", self.run_id), status=info.get("status", "unknown"),
            kind=info.get("kind", "train"), task=info.get("task"), model=info.get("model"),
            sweep=info.get("sweep"), metric=metric, value=value,
            created=info.get("created"), updated=info.get("updated"),
        )

    # ------------------------------------------------------------------------------ helpers
    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise StoreError(f"run {self.run_id}: split {split!r} is not one of {SPLITS}")

    def _read(self, loc: Location, read: Callable[[], T]) -> T:
        try:
            return read()
        except FileNotFoundError:
            raise StoreError(f"run {self.run_id} has no {loc.name} (looked in {self.loc})") from None


@dataclass(frozen=True)
class SweepRecord:
    """A sweep's own files under `{store}/sweeps/{sweep_id}`; its trials are ordinary runs."""

    loc: Location

    @property
    def sweep_id(self) -> str:
        return self.loc.name

    def exists(self) -> bool:
        """A sweep writes its summary when it starts (status running) and again when it ends."""
        return self.loc.join(SUMMARY).exists()

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.loc.join(SUMMARY).write_json(jsonable(dict(summary), f"sweep {self.sweep_id} summary"))

    def read_summary(self) -> dict[str, Any]:
        loc = self.loc.join(SUMMARY)
        try:
            return read_record(loc, dict)
        except FileNotFoundError:
            raise StoreError(f"sweep {self.sweep_id} has no summary (looked in {self.loc})") from None

    def read_config(self) -> ThaliaConfig | None:
        """The sweep's configuration (its base run and `sweep` section), as the driver wrote it; None without one."""
        loc = self.loc.join(CONFIG)
        return parse_config(loc, loc.read_text()) if loc.exists() else None


# ------------------------------------------------------------------------------------- formatting
def _metric_text(metric: str | None, value: float | None) -> str | None:
    if metric is None or value is None:
        return None
    return f"{metric}={value:.4f}" if math.isfinite(value) else f"{metric}={value}"


def _short_time(stamp: str | None) -> str | None:
    return stamp.replace("T", " ")[:19] if stamp else None


def format_runs_table(summaries: Iterable[RunSummary]) -> str:
    """The table of `thalia-ray runs`."""
    rows = [[s.run_id, s.status, s.kind, s.task, s.model, _metric_text(s.metric, s.value), _short_time(s.updated)]
            for s in summaries]
    if not rows:
        return "no runs"
    return render(Table(["ID", "STATUS", "KIND", "TASK", "MODEL", "METRIC", "UPDATED"], rows), "terminal")


def format_metrics(metrics: Mapping[str, Any], indent: str = "  ") -> list[str]:
    """One aligned `name value` line per metric, sorted by name."""
    lines = []
    for name in sorted(metrics):
        value = metrics[name]
        lines.append(f"{indent}{name:<28} {value:.4f}" if isinstance(value, float) else f"{indent}{name:<28} {value}")
    return lines


def _skip_order(row: Mapping[str, Any]) -> int:
    """Training's rows first, then each other command's (a hand-edited unknown one last)."""
    command = row.get("command", "train")
    return SKIP_COMMANDS.index(command) if command in SKIP_COMMANDS else len(SKIP_COMMANDS)


def _skipped_by(row: Mapping[str, Any]) -> str:
    """A row's split, after the command that skipped it unless that was training: `evaluate test`."""
    command = row.get("command", "train")
    return ("" if command == "train" else f"{command} ") + str(row.get("split"))


def format_skipped(skipped: list[Mapping[str, Any]]) -> str:
    """`N samples` with the count per split (training's, then other commands'), e.g.
    `4 samples (test 1, train 2, evaluate test 1)`."""
    ordered = sorted(skipped, key=lambda r: (_skip_order(r), str(r.get("split"))))
    counts = Counter(_skipped_by(r) for r in ordered)  # counted in that order
    per_split = ", ".join(f"{label} {n}" for label, n in counts.items())
    return f"{len(skipped)} samples" + (f" ({per_split})" if per_split else "")


def format_left_out(left_out: Mapping[str, Any]) -> list[str]:
    """`runs show` lines for `left_out.json`: the index's drops by cause, then each split's epoch use."""
    index = left_out.get("index") or []
    lines = []
    if index:
        causes = Counter(str(row.get("reason", "?")).split(":")[0] for row in index).most_common()
        kinds = Counter(str(row.get("what", "?")) for row in index)
        lines.append(f"left out  {', '.join(f'{n} {k}' + ('s' if n != 1 else '') for k, n in kinds.items())} "
                     "of the index ("
                     + ", ".join(f"{cause} ×{n}" for cause, n in causes[:4]) + f"; all in {LEFT_OUT})")
    for n, (split, use) in enumerate((left_out.get("epochs") or {}).items()):
        reasons = ", ".join(f"{reason} ×{count}" for reason, count in (use.get("left_out") or {}).items())
        lines.append(f"{'epochs' if n == 0 else '':<9} {split}: {use.get('used')} of {use.get('drawn')} samples "
                     "per epoch" + (f" (left out: {reasons})" if reasons else ""))
    return lines


def format_run_details(status: Mapping[str, Any], history: list[dict[str, Any]],
                       results: Mapping[str, Any] | None, skipped: list[Mapping[str, Any]] | None = None,
                       request_price: float = DEFAULT_REQUEST_PRICE, left_out: Mapping[str, Any] | None = None) -> str:
    """The text of `thalia-ray runs show ID`, from a run's records (pure); `request_price` prices the
    run's object-storage requests (per 1,000 GETs)."""
    lines = [f"run       {status.get('run_id', '?')}"]
    for key in ("name", "status", "kind", "task", "model", "sweep", "created", "updated"):
        if status.get(key) is not None:
            lines.append(f"{key:<9} {status[key]}")
    host = status.get("host")
    if isinstance(host, Mapping):
        gpus = ", ".join(host.get("gpus") or []) or "no GPU"
        lines.append(f"host      {host.get('hostname', '?')}: {host.get('cpu_count', '?')} CPUs "
                     f"({host.get('cpu_model', '?')}), {gpus}")
    lines.append(f"epochs    {len(history)}")
    if skipped is not None:
        lines.append(f"skipped   {format_skipped(skipped)}")
        lines.extend(f"  {_skipped_by(row)} {row.get('origin')} {row.get('key')}: {row.get('reason')}"
                     for row in skipped[:SHOWN_SKIPPED])
        if len(skipped) > SHOWN_SKIPPED:
            lines.append(f"  ... {len(skipped) - SHOWN_SKIPPED} more in {SKIPPED}")
    if left_out:
        lines.extend(format_left_out(left_out))
    lines.extend(history_lines(history, request_price))
    if results:
        lines.append(f"best      epoch {results.get('best_epoch')}, checkpoint {results.get('best_checkpoint')}")
        lines.append("results:")
        lines.extend(format_metrics(results.get("metrics", {})))
    elif history:
        lines.append("last epoch:")
        lines.extend(format_metrics(history[-1]))
    if status.get("error"):
        lines.append("error:")
        lines.extend(f"  {line}" for line in str(status["error"]).rstrip().splitlines())
    return "\n".join(lines)


def format_whole_frame(evaluation: Mapping[str, Any]) -> list[str]:
    """Lines for a whole-frame evaluation: overall, then each frame."""
    def line(name: str, m: Mapping[str, Any]) -> str:
        ap = "-" if m.get("ap") is None else f"{m['ap']:.4f}"
        return f"  {name:<26} n={m['n']:<5} AP={ap:<7} F1={m['f1']:.4f}"

    lines = [f"whole-frame evaluation (threshold {evaluation['threshold']}, {evaluation.get('out', '?')}):",
             line("overall", evaluation["overall"])]
    return lines + [line(frame, m) for frame, m in sorted(evaluation["per_frame"].items())]


def run_document(record: RunRecord) -> dict[str, Any]:
    """Everything `thalia-ray runs show ID` tells about a run, as one JSON-ready mapping: the fields of
    `run.json`, then `history`, `results`, `skipped`, `left_out` and `whole_frame` (None where the run
    has none)."""
    return {**record.read_status(), "history": record.read_history(), "results": record.read_results(),
            "skipped": record.read_skipped(), "left_out": record.read_left_out(), "whole_frame": record.read_whole_frame()}


def format_run(record: RunRecord) -> str:
    """Read a run's records and describe it for `thalia-ray runs show ID`."""
    run = run_document(record)
    text = format_run_details(run, run["history"], run["results"], run["skipped"], record.request_price(),
                              run["left_out"])
    return "\n".join([text, *format_whole_frame(run["whole_frame"])]) if run["whole_frame"] else text
