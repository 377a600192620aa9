"""Experiment tracking that lands in the store: TensorBoard events, W&B offline runs, one MLflow database.

The store's records are the source of truth (`history.json` is each epoch's commit, `results.json`
the test metrics); the trackers are views of them, written where each view survives the way runs end:

- **TensorBoard, live.** Rank 0 writes each epoch's scalars into a local scratch folder, flushes and
  copies what changed to `{store}/runs/{id}/tracking/tensorboard/` before it reports the epoch, so an
  epoch is tracked before the store commits it and a worker that a sweep scheduler kills has already
  uploaded every epoch it finished. The run's hyperparameters go in first (the HParams plugin).
- **At the run's end, from the records** (`trackers.track_outcome`, on the driver): the test metrics and the
  hyperparameter session's end into TensorBoard; the whole W&B run (config, every epoch, test metrics in
  its summary, written and finished by W&B itself, then uploaded to `{run}/tracking/wandb/`); and the
  run into MLflow (`mlflow_store`). The driver of a run calls it when the run finishes or fails; the
  sweep driver calls it for the trials its scheduler stopped, whose own drivers Ray has killed.

Why W&B is not written live: W&B buffers its record in its own service process and writes it only when
the run finishes, so a worker killed mid-run leaves an empty file (measured: 7 bytes after three logged
epochs), and W&B offers no call that flushes a running run. A run replayed from the records is complete
however the training ended. W&B online mode uploads the same replay when the run ends; live curves come
from TensorBoard (`tensorboard --logdir {store}/runs`).

Tracking never fails a training run: a tracker that cannot write is a warning naming it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from thalia_ray.config import ThaliaConfig
from thalia_ray.storage import Location, StorageError, walk_files
from thalia_ray.store.records import RunRecord

log = logging.getLogger(__name__)

TRACKING = "tracking"  # the folder under a run's own folder (and the store's, for MLflow's database)
TENSORBOARD, WANDB = "tensorboard", "wandb"
KEEP = ".keep"
UPLOAD_ATTEMPTS = 3  # per epoch; then a warning, and the next epoch tries again
# Settings every run is compared by in TensorBoard's HParams table, besides the values a sweep varies.
COMPARED = ("model.task", "model.name", "model.encoder", "model.pretrained", "data.length", "data.crop",
            "train.lr", "train.batch_size", "train.epochs", "train.weight_decay", "train.loss.name", "seed")
# How an ended run's status reads in W&B (exit code) and in TensorBoard's HParams table.
ENDED_WELL = ("finished", "stopped")


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics a tracker can plot (booleans and strings left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_metrics(results: Mapping[str, Any] | None) -> dict[str, float]:
    """What every tracker's summary gets at the end: the test metrics and the best epoch."""
    if not results:
        return {}
    values = {k: v for k, v in numeric(results.get("metrics", {})).items() if k.startswith("test/")}
    if isinstance(results.get("best_epoch"), int):
        values["best_epoch"] = float(results["best_epoch"])
    return values


def hyperparameters(cfg: ThaliaConfig, varied: Mapping[str, Any] | None = None) -> dict[str, float | str | bool]:
    """The values runs are compared by: COMPARED and every value a sweep varied, as plain scalars
    (a list or null becomes its text)."""
    from thalia_ray.config import flatten

    flat = flatten(cfg.model_dump(mode="json"))
    chosen = {k: flat[k] for k in COMPARED if k in flat}
    chosen.update({k: flat.get(k, v) for k, v in (varied or {}).items() if not k.startswith("_")})
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in chosen.items()}


class FolderSync:
    """Mirror a local folder into a store location, uploading only files that changed since last time."""

    def __init__(self, local: Path, target: Location) -> None:
        self.local, self.target = local, target
        self._seen: dict[str, tuple[int, int]] = {}

    def restore(self) -> int:
        """Download what the target already holds (a resumed run); returns the file count."""
        if not self.target.exists():
            return 0
        count = 0
        for remote in walk_files(self.target):
            rel = remote.path[len(self.target.path.rstrip("/")) + 1:]
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(remote.read_bytes())
            self._seen[rel] = self._stamp(dest)
            count += 1
        return count

    def push(self) -> int:
        """Upload new and changed files (symlinks skipped); returns how many were uploaded.

        A tracker may keep writing in the background (creating and deleting temporary files), so a
        file or folder that vanishes during the walk is skipped, and a file that fails to upload does
        not stop the others: every failure is raised together at the end, and those files go again on
        the next push. An empty folder gets an empty `.keep` file first: object stores have no folders.
        """
        uploaded, failed = 0, []
        for path in self._files():
            rel = path.relative_to(self.local).as_posix()
            try:
                stamp = self._stamp(path)
                if self._seen.get(rel) == stamp:
                    continue
                self.target.join(rel).put_file(path)
            except FileNotFoundError:
                continue  # deleted by its tracker since the walk
            except (OSError, StorageError) as err:
                failed.append(f"{rel} ({err})")
                continue
            self._seen[rel] = stamp
            uploaded += 1
        if failed:
            raise StorageError(f"{len(failed)} tracking file(s) not uploaded to {self.target.url}: {failed[0]}")
        return uploaded

    def _files(self) -> list[Path]:
        """The regular files under the local folder, sorted; empty folders below it get a `.keep` file."""
        files: list[Path] = []
        for folder, dirs, names in os.walk(self.local):  # os.walk skips folders that vanish meanwhile
            if not dirs and not names and Path(folder) != self.local:
                with contextlib.suppress(FileNotFoundError):
                    (Path(folder) / KEEP).touch()
                    names = [KEEP]
            files.extend(p for p in (Path(folder) / n for n in names) if not p.is_symlink())
        return sorted(files)

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        info = path.stat()
        return info.st_size, info.st_mtime_ns


def upload(sync: FolderSync, what: str) -> None:
    """Push what changed, retrying a failed upload twice (a stopped sweep trial gets no later chance);
    after the last attempt a warning names what is missing, and the next push tries again."""
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            sync.push()
            return
        except (OSError, StorageError) as err:  # never fails the training run
            if attempt + 1 == UPLOAD_ATTEMPTS:
                log.warning("%s: %s; retried at the next upload", what, err)
            else:
                time.sleep(2.0 ** attempt)


@contextlib.contextmanager
def scratch(run_id: str) -> Iterator[Path]:
    """A local folder for a tracker's files, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"thalia-tracking-{run_id}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ TensorBoard
def _session_start(values: Mapping[str, float | str | bool]) -> Any:
    """TensorBoard's HParams session-start summary for `values` (the plugin infers the table's columns
    from every run's session and its metrics from the run's scalars)."""
    from torch.utils.tensorboard.summary import hparams

    _, start, _ = hparams(dict(values), {})
    return start


def _session_end(status: str) -> Any:
    """TensorBoard's HParams session-end summary: success for a run that finished or was stopped."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    ended = api_pb2.STATUS_SUCCESS if status in ENDED_WELL else api_pb2.STATUS_FAILURE
    content = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=ended),
                                                version=metadata.PLUGIN_DATA_VERSION)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                        metadata=SummaryMetadata(plugin_data=plugin))])


class RunTracker:
    """Rank 0's live TensorBoard of one run: hyperparameters first, then each epoch's scalars, each
    uploaded into `{run}/tracking/tensorboard/` before the epoch is reported."""

    def __init__(self, cfg: ThaliaConfig, run_id: str, target: Location | None,
                 varied: Mapping[str, Any] | None = None) -> None:
        self.run_id = run_id
        self.local = Path(tempfile.mkdtemp(prefix=f"thalia-tracking-{run_id}-"))
        self.sync = FolderSync(self.local, target) if target is not None else None
        self.writer = None
        if TENSORBOARD not in cfg.runtime.tracking:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A replacement worker (Ray restarted the group) continues the run's event files.
        restored = self.sync.restore() if self.sync is not None else 0
        self.writer = SummaryWriter(log_dir=str(self.local / TENSORBOARD))
        if not restored:
            self.writer.add_text("config", f"```\n{cfg.to_yaml()}\n```")
            self.writer.file_writer.add_summary(_session_start(hyperparameters(cfg, varied)))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One epoch's metrics, flushed and uploaded."""
        if self.writer is None:
            return
        for name, value in numeric(metrics).items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()
        if self.sync is not None:
            upload(self.sync, f"run {self.run_id}")

    def finish(self) -> None:
        """Close the event file, upload it and drop the scratch folder."""
        if self.writer is not None:
            self.writer.close()
            if self.sync is not None:
                upload(self.sync, f"run {self.run_id}")
        shutil.rmtree(self.local, ignore_errors=True)


def tensorboard_outcome(record: RunRecord, status: str, history: list[dict[str, Any]],
                         results: Mapping[str, Any] | None) -> None:
    """The test metrics (at the last epoch's step) and the session's end, in a new event file of the run."""
    from torch.utils.tensorboard import SummaryWriter

    with scratch(record.run_id) as local:
        writer = SummaryWriter(log_dir=str(local))
        for name, value in final_metrics(results).items():
            writer.add_scalar(name, value, global_step=len(history))
        writer.file_writer.add_summary(_session_end(status))
        writer.close()
        FolderSync(local, record.loc.join(TRACKING, TENSORBOARD)).push()


# ------------------------------------------------------------------------------------ W&B
def wandb_outcome(record: RunRecord, cfg: ThaliaConfig, status: str, history: list[dict[str, Any]],
                   results: Mapping[str, Any] | None) -> None:
    """Replay the run into W&B from its records: config, every epoch, test metrics and status in the
    summary; W&B writes and closes its own record. Offline, the new folder replaces any earlier one."""
    import wandb

    settings = cfg.runtime.wandb
    target = record.loc.join(TRACKING, WANDB)
    with scratch(record.run_id) as local:
        run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode, id=record.run_id,
                         name=record.run_id, group=settings.group, config=cfg.model_dump(mode="json"),
                         dir=str(local), resume="allow", reinit="create_new",
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                                 disable_code=True, x_disable_machine_info=True))
        try:
            for row in history:
                epoch = int(row.get("epoch", 0))
                if epoch >= run.starting_step:  # online, a resumed run keeps what W&B already has
                    run.log(numeric(row), step=epoch)
            run.summary.update({**final_metrics(results), "status": status})
        finally:
            run.finish(exit_code=0 if status in ENDED_WELL else 1)
            # finish() may return before W&B's service process has written the record out (seen in a
            # busy sweep trial: an empty file uploaded); teardown waits for that process to end.
            wandb.teardown()
        written = [p.name for p in (local / WANDB).glob("offline-run-*") if p.is_dir()]
        FolderSync(local / WANDB, target).push()
    for old in target.list():  # only after the new run is in place
        if old.startswith("offline-run-") and old not in written:
            target.join(old).remove(recursive=True)
