"""Experiment tracking that lands in the store: W&B (offline files), TensorBoard events, MLflow.

Rank 0 of a run writes every tracker's files into a local scratch folder and copies what changed to
`{store}/runs/{run_id}/tracking/{wandb,tensorboard,mlflow}/` after each epoch. Writing locally and
uploading keeps the trackers' own file handling intact on any store (local disk or S3) and on any
node: rank 0 may run on another machine than the driver, and a sweep trial stopped by its scheduler
has already uploaded every epoch it finished. A restarted worker first downloads what the run already
tracked, so TensorBoard and MLflow continue the same run instead of starting a second one.

`runtime.tracking` chooses the set; MLflow's default is a file store inside the run's folder, or any
tracking server given as `runtime.mlflow.tracking_uri` (credentials from MLFLOW_* variables only).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from thalia_ray.config import ThaliaConfig
from thalia_ray.storage import Location, StorageError, walk_files

log = logging.getLogger(__name__)

TRACKING = "tracking"  # the folder under a run's own folder
KEEP = ".keep"
UPLOAD_ATTEMPTS = 3  # per epoch; then a warning, and the next epoch tries again


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics a tracker can plot (booleans and strings left out)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


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

        The trackers keep writing in the background (W&B's own process creates and deletes temporary
        files), so a file or folder that vanishes during the walk is skipped, and a file that fails to
        upload does not stop the others: every failure is raised together at the end, and those files
        go again on the next push. An empty folder gets an empty `.keep` file first: object stores have
        no folders, and MLflow's file store does not recognise a run without its (empty) `artifacts` folder.
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


class RunTracker:
    """The configured trackers of one run on rank 0: log per-epoch metrics, upload, finish."""

    def __init__(self, cfg: ThaliaConfig, run_id: str, target: Location | None) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.local = Path(tempfile.mkdtemp(prefix=f"thalia-tracking-{run_id}-"))
        self.sync = FolderSync(self.local, target) if target is not None else None
        if self.sync is not None:
            self.sync.restore()
        wanted = set(cfg.runtime.tracking)
        self.wandb = self._start_wandb() if "wandb" in wanted and cfg.runtime.wandb.mode != "disabled" else None
        self.tensorboard = self._start_tensorboard() if "tensorboard" in wanted else None
        self.mlflow = self._start_mlflow() if "mlflow" in wanted else None

    # ------------------------------------------------------------------------------ trackers
    def _start_wandb(self) -> Any:
        import wandb

        wb = self.cfg.runtime.wandb
        return wandb.init(project=wb.project, entity=wb.entity, mode=wb.mode, name=self.run_id, id=self.run_id,
                          group=wb.group, resume="allow", config=self.cfg.model_dump(mode="json"),
                          dir=str(self.local), settings=wandb.Settings(silent=True, console="off"))

    def _start_tensorboard(self) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.local / "tensorboard"))
        writer.add_text("config", f"```\n{self.cfg.to_yaml()}\n```")
        return writer

    def _start_mlflow(self) -> tuple[Any, str]:
        """(client, MLflow run id): the run named after ours, created on first use."""
        from mlflow.tracking import MlflowClient

        from thalia_ray.store.leaderboard import flatten

        settings = self.cfg.runtime.mlflow
        uri = settings.tracking_uri
        if uri is None:  # a file store that travels with the run's folder
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
            uri = (self.local / "mlflow").as_uri()
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.mlflow.runName = '{self.run_id}'")
        if found:
            return client, found[0].info.run_id
        from mlflow.entities import Param

        run = client.create_run(experiment_id, run_name=self.run_id,
                                tags={"thalia.sweep": self.cfg.runtime.wandb.group or ""})
        params = [Param(k, str(v)[:500]) for k, v in flatten(self.cfg.model_dump(mode="json")).items()]
        client.log_batch(run.info.run_id, params=params)
        return client, run.info.run_id

    # ------------------------------------------------------------------------------ use
    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """One epoch's metrics to every tracker, then upload what changed."""
        values = numeric(metrics)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, global_step=step)
            self.tensorboard.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            stamp = int(1000 * time.time())
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
        self.upload()

    def upload(self) -> None:
        """Upload what changed, retrying a failed upload twice: a stopped sweep trial gets no later chance.

        Tracking never fails a training run: after the last attempt a warning names what is missing,
        and the files go again with the next epoch.
        """
        if self.sync is None:
            return
        for attempt in range(UPLOAD_ATTEMPTS):
            try:
                self.sync.push()
                return
            except (OSError, StorageError) as err:  # never fails the training run
                if attempt + 1 == UPLOAD_ATTEMPTS:
                    log.warning("run %s: %s; retried next epoch", self.run_id, err)
                else:
                    time.sleep(2.0 ** attempt)

    def finish(self) -> None:
        """Close every tracker, upload the final files and drop the scratch folder."""
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id)
        self.upload()
        shutil.rmtree(self.local, ignore_errors=True)
