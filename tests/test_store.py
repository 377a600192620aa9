"""Experiment store: run records, listings and sweeps, the same on local disk and on S3 (moto)."""
from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from thalia_ray.config import ThaliaConfig
from thalia_ray.storage import S3Options, resolve
from thalia_ray.store.layout import ExperimentStore, check_id, make_run_id
from thalia_ray.store.records import (
    RunSummary,
    StoreError,
    format_run,
    format_run_details,
    format_runs_table,
    headline,
)

HOST = {"hostname": "test-host", "cpu_count": 2, "cpu_model": "cpu", "gpus": []}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ExperimentStore:
    if request.param == "local":
        return ExperimentStore(tmp_path / "runs")
    return ExperimentStore(resolve(f"{request.getfixturevalue('s3_bucket')}/experiments", S3Options.from_environment()))


def _prediction(i: int) -> dict:
    return {"key": f"f/{i}", "frame_id": "124D_04854_171313", "intensity": "Low", "activity_type": "Sill",
            "label": i % 2, "score": np.float32(0.25 * i), "pred": int(i > 1)}


# ------------------------------------------------------------------------------------- ids
def test_run_ids_are_safe_sortable_and_unique():
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert make_run_id("resnet18 v1.2/fast", now, "abc123") == "resnet18-v1-2-fast-20250304-050607-abc123"
    assert make_run_id("...", now, "abc123") == "run-20250304-050607-abc123"
    ids = {ExperimentStore.new_run_id("demo.run") for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"demo-run-\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "a.b", "", " x", "-x"])
def test_bad_ids_are_refused(bad, tmp_path):
    with pytest.raises(StoreError, match="not valid"):
        check_id(bad)
    with pytest.raises(StoreError, match="run id"):
        ExperimentStore(tmp_path).run(bad)


# ------------------------------------------------------------------------------------- records
def test_run_record_round_trip(store):
    cfg = ThaliaConfig.model_validate({"name": "rt", "train": {"lr": 3e-4, "epochs": 2}, "model": {"name": "resnet18"}})
    run = store.run(store.new_run_id("rt"))
    run.write_config(cfg)
    run.set_status("running", kind="train", name="rt", task="classification", model="resnet18", host=HOST)
    run.append_history({"epoch": 1, "val/loss": np.float32(0.75), "val/f1_deformation": torch.tensor(0.5)})
    run.append_history({"epoch": 2, "val/loss": 0.5, "val/f1_deformation": np.float64(0.625)})
    run.write_results({"val/f1_deformation": 0.625, "test/f1_deformation": 0.5}, best_epoch=2,
                      best_checkpoint="experiments/ray/rt/checkpoint_000001")
    assert run.write_predictions("test", (_prediction(i) for i in range(3))) == 3
    run.set_status("finished")

    assert run.read_config() == cfg
    assert run.read_history() == [{"epoch": 1, "val/loss": 0.75, "val/f1_deformation": 0.5},
                                  {"epoch": 2, "val/loss": 0.5, "val/f1_deformation": 0.625}]
    results = run.read_results()
    assert results["metrics"]["test/f1_deformation"] == 0.5 and results["best_epoch"] == 2
    assert results["best_checkpoint"].endswith("checkpoint_000001")
    rows = run.read_predictions("test")
    assert [r["key"] for r in rows] == ["f/0", "f/1", "f/2"] and rows[2]["score"] == 0.5
    status = run.read_status()
    assert status["status"] == "finished" and status["name"] == "rt" and status["host"] == HOST
    assert run.loc.list() == ["config.yaml", "history.json", "predictions", "results.json", "run.json"]



def test_skipped_samples_round_trip_and_show(store):
    run = store.run("skips")
    run.set_status("running", host=HOST)
    assert run.read_skipped() is None and "skipped" not in format_run(run)  # not recorded yet
    rows = [{"epoch": np.int64(1), "split": "train", "origin": "a.zarr", "key": "a/1", "reason": "DataError: chunk"},
            *({"epoch": None, "split": "test", "origin": "shard-000001.tar", "key": f"t/{i}",
               "reason": "sha256 differs"} for i in range(11))]
    assert run.write_skipped(rows) == 12
    got = run.read_skipped()
    assert got[0] == {"command": "train", "epoch": 1, "split": "train", "origin": "a.zarr", "key": "a/1",
                      "reason": "DataError: chunk"}
    assert [r["key"] for r in got[1:]] == [f"t/{i}" for i in range(11)] and got[1]["epoch"] is None
    shown = format_run(run).splitlines()
    assert "skipped   12 samples (test 11, train 1)" in shown and "  train a.zarr a/1: DataError: chunk" in shown
    assert "  ... 2 more in skipped.json" in shown
    with pytest.raises(StoreError, match=r"skipped\[0\]: missing \['reason'\]"):
        run.write_skipped([{"epoch": 1, "split": "val", "origin": "o", "key": "k"}])
    run.write_skipped([])
    assert run.read_skipped() == [] and "skipped   0 samples" in format_run(run)


def _skip(split: str, key: str, epoch: int | None = None) -> dict:
    return {"epoch": epoch, "split": split, "origin": "f.zarr", "key": key, "reason": "MissingChunkError: never written"}


def test_evaluate_skips_join_trainings_and_replace_only_their_own(store):
    """One skipped.json: `evaluate` rows are marked as its own, a re-evaluation of a split replaces only
    its earlier rows of that split, and training (a resumed run) replaces only its own."""
    run = store.run("merged")
    run.set_status("running", host=HOST)
    run.write_skipped([_skip("train", "a/1", epoch=1), _skip("test", "t/1")])
    assert run.write_skipped([_skip("test", "t/1"), _skip("test", "t/2")], "evaluate", ("test",)) == 2
    run.write_skipped([_skip("val", "v/1")], "evaluate", ("val",))
    assert run.write_skipped([_skip("test", "t/3")], "evaluate", ("test",)) == 1  # evaluated again
    got = [(r["command"], r["split"], r["key"]) for r in run.read_skipped()]
    assert got == [("train", "train", "a/1"), ("train", "test", "t/1"), ("evaluate", "val", "v/1"),
                   ("evaluate", "test", "t/3")]
    shown = format_run(run).splitlines()
    assert "skipped   4 samples (test 1, train 1, evaluate test 1, evaluate val 1)" in shown
    assert "  evaluate test f.zarr t/3: MissingChunkError: never written" in shown
    run.write_skipped([])  # training rewrites its rows: evaluate's stay
    assert [r["key"] for r in run.read_skipped()] == ["v/1", "t/3"]
    with pytest.raises(StoreError, match=r"skipped\[0\]: split 'val' is not one of \('test',\)"):
        run.write_skipped([_skip("val", "v/2")], "evaluate", ("test",))
    with pytest.raises(StoreError, match="command 'predict' is not one of"):
        run.write_skipped([], "predict")


def test_skipped_rows_recorded_before_commands_were_marked_are_trainings(store):
    run = store.run("older")
    run.set_status("running", host=HOST)
    run.loc.join("skipped.json").write_json([_skip("test", "t/1")])
    run.write_skipped([_skip("test", "t/2")], "evaluate", ("test",))
    assert [(r["command"], r["key"]) for r in run.read_skipped()] == [("train", "t/1"), ("evaluate", "t/2")]

def test_new_record_describes_its_host(store):
    run = store.run("described")
    run.set_status("running")
    host = run.read_status()["host"]
    assert host["cpu_count"] >= 1 and host["python"] and "ray" in host


def test_status_transitions(store):
    run = store.run("transitions")
    first = run.set_status("running", kind="sweep-trial", sweep="sw1", host=HOST)
    failed = run.set_status("failed", error="Traceback ...\nValueError: boom")
    assert failed["error"].endswith("boom") and failed["created"] == first["created"]
    assert failed["updated"] >= first["updated"] and failed["kind"] == "sweep-trial"
    resumed = run.set_status("running")
    assert "error" not in resumed and resumed["sweep"] == "sw1"
    assert run.set_status("stopped")["status"] == "stopped"
    run.set_status("finished")
    with pytest.raises(StoreError, match="already finished"):
        run.set_status("running")
    assert run.read_status()["status"] == "finished"
    with pytest.raises(StoreError, match="status 'done'"):
        run.set_status("done")
    with pytest.raises(StoreError, match="kind 'training'"):
        store.run("other").set_status("running", kind="training")


def test_missing_and_bad_records_are_clear(store):
    run = store.run("empty")
    assert not run.exists() and run.read_history() == [] and run.read_results() is None
    with pytest.raises(StoreError, match="run empty has no run.json"):
        run.read_status()
    with pytest.raises(StoreError, match="run empty has no config.yaml"):
        run.read_config()
    with pytest.raises(StoreError, match="no run 'empty'"):
        store.existing_run("empty")
    run.write_predictions("val", [_prediction(0)])
    with pytest.raises(StoreError, match=r"no test predictions \(it has: \['val'\]\)"):
        run.read_predictions("test")
    with pytest.raises(StoreError, match="split 'dev'"):
        run.write_predictions("dev", [])
    with pytest.raises(StoreError, match=r"row 1: missing \['score', 'pred'\]"):
        run.write_predictions("val", [_prediction(0), {"key": "k", "frame_id": "f", "intensity": "Low",
                                                       "activity_type": "Sill", "label": 0}])
    with pytest.raises(StoreError, match=r"history\[0\].note: object cannot be stored"):
        run.append_history({"note": object()})
    run.loc.join("config.yaml").write_text("train:\n  lr: -1\n")
    with pytest.raises(StoreError, match="(?s)config.yaml: not a usable configuration.*train.lr"):
        run.read_config()


# ------------------------------------------------------------------------------------- listing
def test_list_runs_and_sweeps(store):
    a = store.run("a-run")
    a.set_status("running", name="a", task="classification", model="resnet18", host=HOST)
    a.append_history({"epoch": 1, "val/f1_deformation": 0.25})
    b = store.run("b-run")
    b.set_status("running", name="b", kind="sweep-trial", sweep="sw", task="segmentation", model="unet", host=HOST)
    b.write_results({"val/iou_deformation": 0.5})
    b.set_status("finished")
    store.run("broken").loc.join("run.json").write_text("{")

    runs = {s.run_id: s for s in store.list_runs()}
    assert set(runs) == {"a-run", "b-run", "broken"}
    assert (runs["a-run"].status, runs["a-run"].metric, runs["a-run"].value) == ("running", "val/f1_deformation", 0.25)
    assert (runs["b-run"].status, runs["b-run"].model, runs["b-run"].value) == ("finished", "unet", 0.5)
    assert runs["broken"].status == "unreadable"
    assert [s.run_id for s in store.list_runs(sweep="sw")] == ["b-run"]

    sweep = store.sweep("sw")
    sweep.write_summary({"best_trial": "b-run", "metric": "val/iou_deformation", "best": np.float32(0.5)})
    assert sweep.read_summary() == {"best_trial": "b-run", "metric": "val/iou_deformation", "best": 0.5}
    with pytest.raises(StoreError, match="sweep nope has no summary"):
        store.sweep("nope").read_summary()
    assert store.root.join("sweeps", "sw", "summary.json").exists()


@pytest.mark.parametrize("damaged", ["run.json", "history.json", "results.json"])
@pytest.mark.parametrize("content", ["{oops", "[1, 2]", "\x00\xff binary"])
def test_one_damaged_record_is_one_unreadable_row_of_runs_list_and_leaderboard_all(tmp_path, capsys, damaged, content):
    from thalia_ray.cli import main

    store = ExperimentStore(str(tmp_path / "runs"))
    for run_id in ("good", "bad"):
        record = store.run(run_id)
        record.set_status("running", name=run_id, task="classification", model="resnet18", host=HOST)
        record.write_config(ThaliaConfig())
        record.append_history({"epoch": 1, "val/f1_deformation": 0.5})
        record.write_results({"val/f1_deformation": 0.5})
        record.set_status("finished")
    store.run("bad").loc.join(damaged).write_bytes(content.encode("latin-1"))
    assert main(["runs", "list", "--json", "--store", str(tmp_path / "runs")]) == 0
    rows = {row["run_id"]: row["status"] for row in json.loads(capsys.readouterr().out)}
    assert rows == {"good": "finished", "bad": "unreadable"}
    assert main(["leaderboard", "all", "--store", str(tmp_path / "runs")]) == 0
    board = capsys.readouterr().out
    bad = [line for line in board.splitlines() if " bad " in line]
    assert " good " in board and all(" unreadable " in line for line in bad)  # shown as such, or left out
    assert main(["runs", "show", "bad", "--store", str(tmp_path / "runs")]) == StoreError.exit_code
    assert f"runs/bad/{damaged}: damaged record" in capsys.readouterr().err


def test_what_a_run_left_out_is_recorded_and_shown(store):
    from thalia_ray.store.records import format_run

    run = store.run("lo")
    run.set_status("running", host=HOST)
    assert run.read_left_out() is None
    index = [{"what": "annotation", "key": "7", "reason": "field 'activity_type': unknown value(s) ['X']",
              "frame_id": "F", "split": "train", "positive": True},
             {"what": "series member", "key": "F/20180101/99", "reason": "no annotation with this uniqueID",
              "frame_id": "F", "split": "val", "positive": None}]
    epochs = {"train": {"drawn": 18, "used": 16, "left_out": {"train.max_steps_per_epoch=2": 2}},
              "val": {"drawn": 8, "used": 8, "left_out": {}}}
    run.write_left_out(index, epochs)
    assert run.read_left_out() == {"index": index, "epochs": epochs}
    shown = format_run(run).splitlines()
    assert "left out  1 annotation, 1 series member of the index (field 'activity_type' ×1, no annotation with " \
           "this uniqueID ×1; all in left_out.json)" in shown
    assert "epochs    train: 16 of 18 samples per epoch (left out: train.max_steps_per_epoch=2 ×2)" in shown
    assert "          val: 8 of 8 samples per epoch" in shown


def test_ray_storage_is_under_the_store(store):
    fs, path = store.ray_storage()
    assert path == store.root.join("ray").path
    fs.create_dir(f"{path}/train-x", recursive=True)
    with fs.open_output_stream(f"{path}/train-x/checkpoint.txt") as stream:
        stream.write(b"ckpt")
    store.root.invalidate()
    assert store.root.join("ray", "train-x", "checkpoint.txt").read_bytes() == b"ckpt"
    assert "ray" not in store.run_ids()


# ------------------------------------------------------------------------------------- formatting
def test_headline_prefers_results_then_last_epoch():
    history = [{"val/f1_deformation": 0.1}, {"val/f1_deformation": 0.3, "val/loss": 1.0}]
    assert headline({"metrics": {"test/f1_deformation": 0.2, "val/f1_deformation": 0.4}}, history) == (
        "test/f1_deformation", 0.2)
    assert headline(None, history) == ("val/f1_deformation", 0.3)
    assert headline({"metrics": {}}, [{"val/loss": 2}]) == ("val/loss", 2.0)
    assert headline(None, []) == (None, None)


def test_format_runs_table():
    rows = [
        RunSummary("long-run-id-1", "a", "finished", "train", "classification", "resnet18", None,
                   "test/f1_deformation", 0.81234, "2025-01-01T00:00:00+00:00", "2025-01-01T01:02:03+00:00"),
        RunSummary("r2", "b", "failed", "bench", None, None, None, None, None, None, None),
    ]
    lines = format_runs_table(rows).splitlines()
    assert lines[0].split() == ["ID", "STATUS", "KIND", "TASK", "MODEL", "METRIC", "UPDATED"]
    assert lines[2].split() == ["long-run-id-1", "finished", "train", "classification", "resnet18",
                                "test/f1_deformation=0.8123", "2025-01-01", "01:02:03"]
    assert lines[3].split() == ["r2", "failed", "bench", "—", "—", "—", "—"]
    assert lines[2].index("finished") == lines[3].index("failed") == lines[0].index("STATUS")
    assert format_runs_table([]) == "no runs"


def test_format_run(tmp_path):
    run = ExperimentStore(tmp_path).run("shown")
    run.set_status("running", name="shown", task="classification", model="resnet18", host=HOST)
    run.append_history({"epoch": 1, "val/loss": 0.5})
    text = format_run(run)
    assert "status    running" in text and "epochs    1" in text and "val/loss" in text
    assert "test-host: 2 CPUs" in text
    assert "error" not in text
    run.set_status("failed", error="Traceback\nRuntimeError: out of memory")
    failed = format_run(run)
    assert "status    failed" in failed
    assert failed.splitlines()[-3:] == ["error:", "  Traceback", "  RuntimeError: out of memory"]
    details = format_run_details({"run_id": "x", "status": "finished"}, [],
                                 {"metrics": {"test/f1_deformation": 0.5}, "best_epoch": 3, "best_checkpoint": "c"})
    assert "best      epoch 3, checkpoint c" in details and "test/f1_deformation" in details


# ------------------------------------------------------------------------------------- one writer
def _hold_lease_in_a_subprocess(store: ExperimentStore, run_id: str):
    """Another driver: a fresh process that takes the run's lease, marks it running and waits."""
    import subprocess
    import sys

    from tests.helpers import cli_env

    code = ("import sys; from thalia_ray.storage import S3Options, resolve\n"
            "from thalia_ray.store.layout import ExperimentStore\n"
            f"record = ExperimentStore(resolve({store.root.url!r}, S3Options.from_environment())).run({run_id!r})\n"
            "lease = record.acquire(settle_s=0); record.set_status('running')\n"
            "print('held', flush=True); sys.stdin.readline(); lease.release()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_run_id_is_refused_and_a_dead_drivers_lease_is_taken_over(store):
    from thalia_ray.store.records import RunBusyError

    proc = _hold_lease_in_a_subprocess(store, "shared-id")
    try:
        with pytest.raises(RunBusyError, match=rf"run shared-id is already being written by pid {proc.pid} on"):
            store.run("shared-id").acquire(settle_s=0)
        assert store.reconcile_runs() == []  # a live driver's run stays running
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    record = store.run("shared-id")
    lease = record.acquire(settle_s=0)  # the driver died on this machine: no need to wait for staleness
    try:
        status = record.read_status()
        assert status["status"] == "interrupted" and f"pid {proc.pid}" in status["error"]
        assert "rerun with the same --run-id" in status["error"]
        assert record.read_lease().owner == lease.holder.owner and record.read_lease().pid == os.getpid()
    finally:
        lease.release()
    assert record.read_lease() is None


def test_a_lease_from_another_machine_lapses_only_when_its_heartbeat_is_stale(store):
    from thalia_ray.store.records import Holder, RunBusyError

    record = store.run("remote-id")
    record.set_status("running")
    fresh = Holder("other", "another-host", 1, None, time.time())
    record.write_lease(fresh)
    with pytest.raises(RunBusyError, match="pid 1 on another-host, last heartbeat 0 s ago"):
        record.acquire(settle_s=0)
    record.write_lease(Holder("other", "another-host", 1, None, time.time() - 121))
    assert store.reconcile_runs() == ["remote-id"]
    assert "another-host, last heartbeat 121 s ago" in record.read_status()["error"]
    record.acquire(settle_s=0).release()


def test_a_driver_whose_lease_was_taken_over_writes_no_outcome(store):
    from thalia_ray.store.records import Holder, RunBusyError

    record = store.run("taken")
    lease = record.acquire(settle_s=0)
    try:
        lease.renew()
        lease.check()  # still ours
        record.write_lease(Holder("intruder", "another-host", 7, None, time.time()))
        lease.renew()
        with pytest.raises(RunBusyError, match="taken over by another driver .pid 7 on another-host"):
            lease.check()
    finally:
        lease.release()
    assert record.read_lease().owner == "intruder"  # release never removes someone else's lease
