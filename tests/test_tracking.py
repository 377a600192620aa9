"""Tracking that lands in the store: W&B offline files, TensorBoard events and an MLflow file store per run."""
from __future__ import annotations

from pathlib import Path

import pytest

from thalia_ray.config import ThaliaConfig
from thalia_ray.storage import resolve
from thalia_ray.train.tracking import TRACKING, FolderSync, RunTracker

from tests.helpers import read_mlflow_metrics, read_tensorboard_scalars


def _cfg(trackers: list[str]) -> ThaliaConfig:
    return ThaliaConfig.model_validate({"runtime": {"tracking": trackers, "wandb": {"mode": "offline"}}})


def test_every_tracker_writes_into_the_run_folder_and_a_restarted_tracker_continues_the_same_run(tmp_path):
    target = resolve(tmp_path / "store" / "runs" / "r1" / TRACKING)
    tracker = RunTracker(_cfg(["wandb", "tensorboard", "mlflow"]), "r1", target)
    tracker.log({"epoch": 1, "val/loss": 0.75, "lr": 1e-3, "note": "text is skipped"}, step=1)
    tracker.finish()
    # a replacement worker (Ray restarted the group) resumes the same trackers from what the store holds
    again = RunTracker(_cfg(["tensorboard", "mlflow"]), "r1", target)
    again.log({"epoch": 2, "val/loss": 0.5, "lr": 5e-4}, step=2)
    again.finish()

    folder = Path(target.path)
    assert list((folder / "wandb").glob("offline-run-*/run-r1.wandb"))
    assert read_tensorboard_scalars(folder / "tensorboard")["val/loss"] == [(1, 0.75), (2, 0.5)]
    assert read_mlflow_metrics(folder / "mlflow", "r1")["val/loss"] == [(1, 0.75), (2, 0.5)]
    assert not tracker.local.exists() and not again.local.exists()  # scratch folders are removed


def test_no_tracker_configured_writes_nothing(tmp_path):
    target = resolve(tmp_path / TRACKING)
    tracker = RunTracker(_cfg([]), "r2", target)
    tracker.log({"epoch": 1, "val/loss": 0.1}, step=1)
    tracker.finish()
    assert not target.exists()


def test_folder_sync_uploads_only_changed_files_to_s3(s3_bucket, tmp_path):
    local = tmp_path / "local"
    (local / "a").mkdir(parents=True)
    (local / "a" / "x.txt").write_text("one")
    (local / "y.txt").write_text("two")
    target = resolve(f"{s3_bucket}/runs/r/{TRACKING}")
    sync = FolderSync(local, target)
    assert sync.push() == 2
    assert sync.push() == 0
    (local / "y.txt").write_text("two, longer")
    assert sync.push() == 1
    restored = FolderSync(tmp_path / "restored", target)
    assert restored.restore() == 2
    assert (tmp_path / "restored" / "y.txt").read_text() == "two, longer"


def test_a_file_that_fails_to_upload_does_not_hold_back_the_others_and_goes_next_time(tmp_path):
    from thalia_ray.storage import StorageError

    local, store = tmp_path / "local", tmp_path / "store"
    (local / "a").mkdir(parents=True)
    (local / "a" / "x.txt").write_text("one")
    (local / "empty").mkdir()
    (local / "y.txt").write_text("two")
    store.mkdir()
    (store / "a").write_text("a file where the folder a/ should go")  # a/x.txt cannot be written
    sync = FolderSync(local, resolve(store))
    with pytest.raises(StorageError, match="1 tracking file.*a/x.txt"):
        sync.push()
    assert (store / "y.txt").read_text() == "two" and (store / "empty" / ".keep").exists()
    (store / "a").unlink()
    assert sync.push() == 1  # only the file that failed
    assert (store / "a" / "x.txt").read_text() == "one"


@pytest.mark.parametrize("bad", [["neptune"], "wandb"])
def test_unknown_tracker_is_a_config_error(bad):
    from thalia_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="runtime.tracking"):
        load_config(None, [f"runtime.tracking={bad}"])
