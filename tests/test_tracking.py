"""Tracking that lands in the store: rank 0's live TensorBoard, and every tracker written from a run's
records when it ends (W&B offline runs, TensorBoard test metrics, one MLflow database per store)."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from thalia_ray.config import ThaliaConfig
from thalia_ray.storage import S3Options, local, resolve
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.train import mlflow_store
from thalia_ray.train.trackers import track_outcome
from thalia_ray.train.tracking import TRACKING, FolderSync, RunTracker, hyperparameters

from tests.helpers import read_mlflow_runs, read_tensorboard_scalars, read_wandb_run

ALL = ["wandb", "tensorboard", "mlflow"]


def _cfg(trackers: list[str], **values) -> ThaliaConfig:
    cfg = ThaliaConfig.model_validate({"runtime": {"tracking": trackers, "wandb": {"mode": "offline"}}})
    return cfg.with_overrides(values) if values else cfg


def _epoch(epoch: int) -> dict:
    return {"epoch": epoch, "train/loss": 1.0 / epoch, "val/loss": 0.9 / epoch + 1e-9, "val/f1_deformation": 0.1 * epoch,
            "lr": 1e-3, "note": "text is not a metric"}


def _ended_run(store: ExperimentStore, run_id: str, status: str, epochs: int, cfg: ThaliaConfig | None = None,
               tested: bool = True):
    """A run's records as a driver leaves them: config, status, history and (finished) results."""
    record = store.run(run_id)
    record.write_config(cfg or _cfg(ALL))
    record.set_status("running", sweep="s1", sweep_config={"train.lr": 1e-3})
    record.write_history([_epoch(e) for e in range(1, epochs + 1)])
    if status == "finished" and tested:
        record.write_results({"val/loss": 0.45, "test/f1_deformation": 0.625, "test/auroc_deformation": 0.8125},
                             best_epoch=epochs)
    record.set_status(status)
    return record


def _wandb(record) -> dict:
    [path] = Path(record.loc.path, TRACKING, "wandb").glob("offline-run-*/run-*.wandb")
    return read_wandb_run(path)


def test_live_tensorboard_holds_hyperparameters_and_every_epoch_and_a_restarted_worker_continues(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    target = local(tmp_path / "store" / "runs" / "r1" / TRACKING)
    cfg = _cfg(["tensorboard"], **{"train.lr": 3e-4, "model.name": "mobilenetv3_small"})
    tracker = RunTracker(cfg, "r1", target, varied={"train.lr": 3e-4})
    tracker.log(_epoch(1), step=1)
    folder = Path(target.path, "tensorboard")
    assert read_tensorboard_scalars(folder)["val/loss"] == [(1, pytest.approx(0.9, rel=1e-6))]  # uploaded at once
    tracker.finish()
    again = RunTracker(cfg, "r1", target, varied={"train.lr": 3e-4})  # a replacement worker: same run continues
    again.log(_epoch(2), step=2)
    again.finish()

    assert [step for step, _ in read_tensorboard_scalars(folder)["val/loss"]] == [1, 2]
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    [content] = [data for data in mux.PluginRunToTagToContent(metadata.PLUGIN_NAME).values()]
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["train.lr"].number_value == pytest.approx(3e-4)
    assert start.hparams["model.name"].string_value == "mobilenetv3_small"
    assert not tracker.local.exists() and not again.local.exists()  # scratch folders are removed


def test_hyperparameters_are_the_compared_settings_and_every_swept_one():
    cfg = _cfg([], **{"train.loss.focal_gamma": 1.5, "data.geomorphology": ["insar_difference"]})
    values = hyperparameters(cfg, {"train.loss.focal_gamma": 1.5, "data.geomorphology": ["insar_difference"],
                                   "_internal": 1})
    assert values["train.loss.focal_gamma"] == 1.5 and values["model.name"] == "resnet18"
    assert values["data.geomorphology"] == "['insar_difference']" and "_internal" not in values
    assert values["model.pretrained"] == "None" and values["seed"] == 0


def test_a_finished_run_is_replayed_into_every_tracker_with_its_test_metrics(tmp_path):
    store = ExperimentStore(tmp_path / "store")
    record = _ended_run(store, "done", "finished", epochs=3)
    track_outcome(store, "done")

    wandb = _wandb(record)
    assert [row["epoch"] for row in wandb["history"]] == [1, 2, 3]
    assert [row["val/loss"] for row in wandb["history"]] == [row["val/loss"] for row in record.read_history()]
    assert "note" not in wandb["history"][0] and wandb["exit_code"] == 0
    assert wandb["summary"]["test/f1_deformation"] == 0.625 and wandb["summary"]["best_epoch"] == 3
    assert wandb["summary"]["status"] == "finished" and wandb["config"]["train"]["lr"] == 1e-4

    scalars = read_tensorboard_scalars(Path(record.loc.path, TRACKING, "tensorboard"))
    assert scalars["test/f1_deformation"] == [(3, 0.625)] and scalars["test/auroc_deformation"] == [(3, 0.8125)]

    mlflow = read_mlflow_runs(Path(mlflow_store.database(store).path))["done"]
    assert mlflow["status"] == "FINISHED" and mlflow["params"]["train.lr"] == "0.0001"
    assert mlflow["metrics"]["val/loss"] == [(e, _epoch(e)["val/loss"]) for e in (1, 2, 3)]
    assert mlflow["metrics"]["test/f1_deformation"] == [(3, 0.625)]


def test_a_stopped_run_keeps_every_epoch_in_every_tracker_and_a_later_replay_replaces_it(tmp_path):
    """The case Ray's scheduler leaves: history written, driver killed, the sweep marks it stopped."""
    store = ExperimentStore(tmp_path / "store")
    record = _ended_run(store, "cut", "stopped", epochs=2)
    track_outcome(store, "cut")
    assert [row["epoch"] for row in _wandb(record)["history"]] == [1, 2]
    assert _wandb(record)["summary"]["status"] == "stopped"
    assert read_mlflow_runs(Path(mlflow_store.database(store).path))["cut"]["status"] == "KILLED"

    # resumed later and finished: one W&B run (the new replay), MLflow adds only what it lacked
    record.set_status("running")
    record.write_history([_epoch(e) for e in (1, 2, 3)])
    record.write_results({"test/f1_deformation": 0.5}, best_epoch=3)
    record.set_status("finished")
    track_outcome(store, "cut")
    assert [row["epoch"] for row in _wandb(record)["history"]] == [1, 2, 3]
    run = read_mlflow_runs(Path(mlflow_store.database(store).path))["cut"]
    assert [step for step, _ in run["metrics"]["val/loss"]] == [1, 2, 3] and run["status"] == "FINISHED"
    assert mlflow_store.sync_mlflow(store, ["cut"]) == 0  # nothing new: nothing written


def test_trackers_not_configured_are_not_written(tmp_path):
    store = ExperimentStore(tmp_path / "store")
    record = _ended_run(store, "quiet", "finished", epochs=1, cfg=_cfg(["tensorboard"]))
    track_outcome(store, "quiet")
    assert sorted(p.name for p in Path(record.loc.path, TRACKING).iterdir()) == ["tensorboard"]
    assert not mlflow_store.database(store).exists()
    tracker = RunTracker(_cfg([]), "r2", local(tmp_path / "none"))
    tracker.log({"epoch": 1, "val/loss": 0.1}, step=1)
    tracker.finish()
    assert not (tmp_path / "none").exists()


def _sync_in_another_process(store: str, run_id: str) -> None:
    mlflow_store.sync_mlflow(ExperimentStore(store), [run_id])


def test_drivers_ending_runs_at_once_all_land_in_the_one_mlflow_database(tmp_path):
    store = ExperimentStore(tmp_path / "store")
    names = [f"trial-{i}" for i in range(3)]
    for name in names:
        _ended_run(store, name, "finished", epochs=2)
    context = multiprocessing.get_context("spawn")
    drivers = [context.Process(target=_sync_in_another_process, args=(store.root.path, n)) for n in names]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join(120)
    assert [d.exitcode for d in drivers] == [0, 0, 0]
    runs = read_mlflow_runs(Path(mlflow_store.database(store).path))
    assert sorted(runs) == names and all(r["metrics"]["test/f1_deformation"] == [(2, 0.625)] for r in runs.values())
    assert not Path(mlflow_store.database(store).path + ".lock").exists()


def test_the_mlflow_lock_waits_for_a_live_holder_and_takes_over_a_lapsed_one(tmp_path, monkeypatch):
    from dataclasses import asdict

    from thalia_ray.store.records import Holder, StoreError

    db = local(tmp_path / "tracking" / "mlflow.db")
    lock = local(str(tmp_path / "tracking" / "mlflow.db.lock"))
    monkeypatch.setattr(mlflow_store, "LOCK_WAIT_S", 2.0)
    monkeypatch.setattr(mlflow_store, "LOCK_SETTLE_S", 0.1)
    lock.write_json(asdict(Holder("someone", "elsewhere", 1, None, time.time())))
    with pytest.raises(StoreError, match="locked by pid 1 on elsewhere"):
        with mlflow_store._locked(db):
            pass
    lock.write_json(asdict(Holder("someone", "elsewhere", 1, None, time.time() - mlflow_store.LOCK_STALE_S - 1)))
    with mlflow_store._locked(db):
        assert lock.read_json()["owner"] != "someone"
    assert not lock.exists()


def test_the_mlflow_database_of_an_s3_store_is_updated_in_a_copy_and_put_back(s3_bucket, tmp_path):
    store = ExperimentStore(resolve(f"{s3_bucket}/store", S3Options.from_environment()))
    _ended_run(store, "remote-a", "finished", epochs=1)
    _ended_run(store, "remote-b", "stopped", epochs=2)
    assert mlflow_store.sync_mlflow(store, ["remote-a"]) == 1
    assert mlflow_store.sync_mlflow(store, ["remote-b"]) == 1
    local = tmp_path / "mlflow.db"
    local.write_bytes(mlflow_store.database(store).read_bytes())
    runs = read_mlflow_runs(local)
    assert {name: run["status"] for name, run in runs.items()} == {"remote-a": "FINISHED", "remote-b": "KILLED"}
    assert mlflow_store.view_command(store).startswith(f"aws s3 cp {mlflow_store.database(store).url} ")


def test_folder_sync_uploads_only_changed_files_to_s3(s3_bucket, tmp_path):
    local = tmp_path / "local"
    (local / "a").mkdir(parents=True)
    (local / "a" / "x.txt").write_text("one")
    (local / "y.txt").write_text("two")
    target = resolve(f"{s3_bucket}/runs/r/{TRACKING}", S3Options.from_environment())
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
    sync = FolderSync(local, resolve(store, S3Options.from_environment()))
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
