"""The HTML report: figures from store records, the gallery read back from the dataset, checked in Chromium."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from thalia_ray.config import ThaliaConfig
from thalia_ray.report import figures, samples
from thalia_ray.report.page import write_report
from thalia_ray.store import ExperimentStore

from tests.helpers import assert_report_renders


def test_curves_match_a_hand_computed_example():
    found = figures.curves(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1]))
    assert found.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert found.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert found.precision.tolist() == [1.0, 1.0, 0.5, 2 / 3, 0.5]
    assert figures.curves(np.array([1, 1]), np.array([0.2, 0.3])) is None  # one class: undefined
    assert figures.confusion_counts([1, 0, 1, 0], [1, 1, 0, 0]).tolist() == [[1, 1], [1, 1]]


def test_restarts_are_found_where_the_count_goes_up():
    history = [{"epoch": 1, "restarts": 0}, {"epoch": 2, "restarts": 1}, {"epoch": 3, "restarts": 1},
               {"epoch": 4, "restarts": 2}]
    assert figures.restart_epochs(history) == [2, 4]


def test_gallery_pick_takes_confident_hits_and_mistakes_first():
    rows = [{"label": 1, "pred": 1, "score": s} for s in (0.6, 0.9)] + [{"label": 0, "pred": 1, "score": 0.7},
                                                                       {"label": 1, "pred": 0, "score": 0.1}]
    picked = samples.pick(rows, {"TP": 1, "FP": 1, "FN": 1, "TN": 1})
    assert [(samples.outcome(r), r["score"]) for r in picked] == [("TP", 0.9), ("FP", 0.7), ("FN", 0.1)]


def _stored_run(store: ExperimentStore, root, run_id: str, task: str = "classification", length: int = 1,
                sweep: str | None = None, stopped: bool = False, lr: float = 1e-3) -> None:
    """A run's records as training writes them, predictions for the real test samples of `root`."""
    from thalia_ray.data.index import SampleIndex

    cfg = ThaliaConfig.model_validate({"data": {"root": str(root), "crop": 32, "length": length},
                                       "model": {"task": task}, "train": {"lr": lr}})
    record = store.run(run_id)
    record.write_config(cfg)
    record.set_status("running", task=task, model=cfg.model.name, sweep=sweep,
                      **({"kind": "sweep-trial", "sweep_config": {"train.lr": lr}} if sweep else {}))
    epochs = 1 if stopped else 3
    record.write_history([{"epoch": e, "train/loss": 1 / e, "val/loss": 1.2 / e, "val/f1_deformation": 0.2 * e,
                           "lr": lr / e, "restarts": int(e == 3)} for e in range(1, epochs + 1)])
    if stopped:
        record.set_status("stopped", reason="stopped early by the sweep scheduler")
        return
    rng = np.random.default_rng(0)
    test = SampleIndex.from_config(cfg.data, cfg.seed).samples("test")
    rows = []
    for sample in test:
        score = float(0.3 * sample.label + 0.6 * rng.random())  # some of each outcome
        rows.append({"key": sample.key, "frame_id": sample.frame_id, "intensity": "Low", "activity_type": "Sill",
                     "label": sample.label, "score": score, "pred": int(score > 0.5)})
    record.write_predictions("test", rows)
    record.write_results({"test/f1_deformation": 0.5, "test/precision_deformation": 0.4,
                          "test/f1_non_deformation": 0.9, "test/loss": 0.3, "val/f1_deformation": 0.6},
                         best_epoch=3, best_checkpoint=None, epochs=3, restarts=1)
    record.set_status("finished")


def _predict_output(record, out, frame_id: str) -> None:
    """An output cube as `thalia-ray predict` writes it, and the whole-frame record that points at it."""
    import xarray as xr

    probability = np.random.default_rng(1).random((2, 3, 24, 24)).astype("float16")
    dims = ("primary_date", "secondary_date", "y", "x")
    xr.Dataset({samples.PROBABILITY: (dims, probability)}).to_zarr(
        str(out / f"{frame_id}.zarr"), zarr_format=3, consolidated=False)
    record.loc.join("whole_frame.json").write_json({"out": str(out), "overall": {"ap": 0.5, "f1": 0.4, "n": 6}})


def test_run_report_opens_in_chromium_with_every_figure_and_the_gallery(synthetic_root, tmp_path):
    store = ExperimentStore(tmp_path / "store")
    _stored_run(store, synthetic_root, "series-run", length=2)
    _predict_output(store.run("series-run"), tmp_path / "predicted", "078A_00001_010569")
    page = write_report(store, "series-run")
    assert page.path == str(tmp_path / "store" / "runs" / "series-run" / "report" / "index.html")
    text = page.read_text()
    for heading in ("Learning curves", "Test evaluation", "Breakdowns", "Gallery of test samples"):
        assert heading in text
    assert ">false_alarms</th>" in text  # the subgroup columns (metrics.subgroup_metrics)
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    assert text.count('alt="TP ') >= 1 and text.count('alt="FN ') + text.count('alt="FP ') >= 1
    assert 'alt="map 078A_00001_010569"' in text  # predict's output, found through its whole-frame record
    assert_report_renders(page, min_images=7)


def test_sweep_report_ranks_trials_and_marks_the_stopped_one(synthetic_root, tmp_path):
    store = ExperimentStore(tmp_path / "store")
    _stored_run(store, synthetic_root, "sw-a", sweep="sw", lr=1e-3)
    _stored_run(store, synthetic_root, "sw-b", sweep="sw", lr=0.5, stopped=True)
    store.sweep("sw").write_summary({
        "sweep_id": "sw", "status": "finished", "metric": "val/f1_deformation", "mode": "max", "best_run": "sw-a",
        "best_value": 0.6, "seconds": 12.0, "worker_seconds": 20.0,
        "trials": [{"run_id": "sw-a", "config": {"train.lr": 1e-3}, "status": "finished", "epochs": 3, "best": 0.6},
                   {"run_id": "sw-b", "config": {"train.lr": 0.5}, "status": "stopped", "epochs": 1, "best": 0.2}]})
    page = write_report(store, "sw", out=tmp_path / "elsewhere")
    assert page.path == str(tmp_path / "elsewhere" / "index.html")
    text = page.read_text()
    assert text.index(">sw-a<") < text.index(">sw-b<")  # ranked
    assert "stopped after epoch 1" in text and "train.lr" in text and "Best trial: sw-a" in text
    assert_report_renders(page, min_images=4)


def test_report_of_an_unknown_id_is_a_clear_error(tmp_path, capsys):
    from thalia_ray.cli import main
    from thalia_ray.errors import StoreProblem

    assert main(["report", "nope", "--store", str(tmp_path)]) == StoreProblem.exit_code
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_leaderboard_csv_and_json_are_one_row_per_run(synthetic_root, tmp_path, capsys):
    import pandas as pd

    from thalia_ray.cli import main

    store = ExperimentStore(tmp_path / "store")
    _stored_run(store, synthetic_root, "r-a", lr=1e-3)
    _stored_run(store, synthetic_root, "r-b", lr=3e-4)
    _stored_run(store, synthetic_root, "r-c", lr=0.5, stopped=True)  # stopped early: validation metrics only
    assert main(["leaderboard", "--store", str(store.root.path), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame["run_id"].tolist()[2] == "r-c" and len(frame) == 3  # ranked last: no test metric
    assert sorted(frame["train.lr"]) == [3e-4, 1e-3, 0.5]  # the differing value as a column
    assert frame["test/precision_deformation"].tolist()[:2] == [0.4, 0.4]
    assert pd.isna(frame["test/f1_deformation"].iloc[2])  # an empty cell, not a dash
    assert frame["val/f1_deformation"].iloc[2] == pytest.approx(0.2, abs=0)  # full precision
    assert main(["leaderboard", "--store", str(store.root.path), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3] and rows[0]["val/f1_deformation"] == 0.6
    assert rows[2]["test/f1_deformation"] is None
    assert main(["leaderboard", "--store", str(store.root.path), "--format", "csv", "--breakdown", "intensity"]) == 0
    groups = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert groups["intensity"].tolist() == ["Low"] and groups["n"].iloc[0] > 0


def test_leaderboard_and_report_show_a_dead_drivers_run_as_interrupted(synthetic_root, tmp_path, capsys):
    """A run left `running` by a driver on another machine that went silent is not shown as running."""
    import time

    from thalia_ray.cli import main
    from thalia_ray.store.records import Holder

    store = ExperimentStore(tmp_path / "store")
    _stored_run(store, synthetic_root, "r-live", lr=1e-3)
    _stored_run(store, synthetic_root, "r-dead", lr=0.5, stopped=True)  # validation metrics only
    dead = store.run("r-dead")
    dead.set_status("running")
    dead.write_lease(Holder("gone", "another-host", 1, None, time.time() - 600))
    assert main(["leaderboard", "--store", str(store.root.path), "--format", "json"]) == 0
    rows = {r["run_id"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert rows == {"r-live": "finished", "r-dead": "interrupted"}
    dead.set_status("running")  # and once more, for the report of that run alone
    assert main(["report", "r-dead", "--store", str(store.root.path)]) == 0
    assert dead.read_status()["status"] == "interrupted" and store.run("r-live").read_status()["status"] == "finished"


def test_synth_json_summary_parses(tmp_path, capsys):
    from thalia_ray.cli import main

    assert main(["synth", "--out", str(tmp_path / "d"), "--frames", "1", "--size", "32", "--max-groups", "2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 1 and summary["pairs"] > 0


@pytest.mark.parametrize("argv", [["export", "--out", "{tmp}/shards", "--length", "1", "--split", "val"],
                                  ["prepare", "stats", "--split", "val"]])
def test_ray_commands_print_json_summaries(ray_cluster, synthetic_root, tmp_path, capsys, argv):
    from thalia_ray.cli import main

    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*args, "--data", str(synthetic_root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary  # a non-empty JSON object


def test_demo_reports_the_best_trial_with_test_results(synthetic_root, tmp_path):
    """A stopped trial has validation metrics only; the demo's report goes to the best tested trial."""
    from thalia_ray.demo import best_run

    store = ExperimentStore(tmp_path / "store")
    _stored_run(store, synthetic_root, "t-stopped", sweep="sw", stopped=True)
    _stored_run(store, synthetic_root, "t-done", sweep="sw")
    assert best_run(store, "sw") == "t-done"
    assert best_run(store, "other") is None
