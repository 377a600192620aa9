"""The HTML report: a page for every run kind and task (T = 1 and series) and for sweeps, figures whose
texts and panels never run into each other, the gallery read back from the dataset, checked in Chromium."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from thalia_ray.report import figures, samples
from thalia_ray.report.page import write_report
from thalia_ray.store import ExperimentStore

from tests.helpers import assert_report_renders
from tests.stores import write_run, write_sweep


def test_restarts_are_found_where_the_count_goes_up():
    history = [{"epoch": 1, "restarts": 0}, {"epoch": 2, "restarts": 1}, {"epoch": 3, "restarts": 1},
               {"epoch": 4, "restarts": 2}]
    assert figures.restart_epochs(history) == [2, 4]


def test_gallery_pick_takes_confident_hits_and_mistakes_first():
    rows = [{"label": 1, "pred": 1, "score": s} for s in (0.6, 0.9)] + [{"label": 0, "pred": 1, "score": 0.7},
                                                                       {"label": 1, "pred": 0, "score": 0.1}]
    picked = samples.pick(rows, {"TP": 1, "FP": 1, "FN": 1, "TN": 1})
    assert [(samples.outcome(r), r["score"]) for r in picked] == [("TP", 0.9), ("FP", 0.7), ("FN", 0.1)]


# ------------------------------------------------------------------------------------- layout
def _overlaps(fig) -> list[tuple[str, str]]:
    """Texts and panels of a drawn figure that cover each other: panels with their titles, tick labels and
    colour bars, the figure's title, and tick labels of one axis among themselves."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []

    def clash(boxes):
        for i, (a, box_a) in enumerate(boxes):
            for b, box_b in boxes[i + 1:]:
                inside = box_a.intersection(box_a, box_b)
                if inside is not None and inside.width * inside.height > 1:
                    found.append((a, b))

    panels = [(f"panel {i} {ax.get_title()!r}", ax.get_tightbbox(renderer)) for i, ax in enumerate(fig.axes)]
    clash(panels + [("figure title", fig._suptitle.get_window_extent(renderer))] if fig._suptitle else panels)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            clash([(t.get_text(), t.get_window_extent(renderer)) for t in axis.get_ticklabels() if t.get_text()])
    return found


def _sample(steps: int, predicted: bool) -> samples.GallerySample:
    rng = np.random.default_rng(0)
    mask = np.zeros((steps, 32, 32), np.uint8)
    mask[:, 8:20, 8:20] = 1
    return samples.GallerySample(
        "078A_00001_010569-20200812-1000019_1000020_1000021", "TP", 0.79, 1, 1,
        [f"20200812/2020090{t}" for t in range(steps)], rng.uniform(-3, 3, (steps, 32, 32)),
        rng.uniform(0, 200, (steps, 32, 32)), rng.uniform(2200, 3100, (steps, 32, 32)), mask, mask.max(axis=0),
        rng.random((32, 32)) if predicted else None)


@pytest.mark.parametrize("steps, predicted", [(1, False), (3, False), (1, True), (2, True)])
def test_gallery_panels_colour_bars_and_titles_never_overlap(steps, predicted):
    """Seen before: the DEM colour bar's labels inside the score panel, the sample's title in a panel's."""
    fig = figures.draw_gallery(_sample(steps, predicted))
    assert _overlaps(fig) == []
    assert len(fig.axes) == 2 * 3 * steps + (2 if predicted else 1)  # panels and colour bars; one answer panel


def test_breakdown_labels_of_long_volcano_names_never_overlap():
    names = ["yonemaru-sumiyoshiike", "kirishimayama", "Sand Mountain Field", "Blue Lake Crater", "Tshibinda",
             "Nyamuragira", "colli_albani", "Karisimbi", "Three Sisters"]
    groups = {n: {"recall": 0.5, "false_alarms": 0.1, "ap": 0.6, "n": 5, "n_deformation": 2} for n in names}
    assert _overlaps(figures.draw_breakdown(groups, "volcano")) == []


# ------------------------------------------------------------------------------------- pages
def _predict_output(record, out, frame_id: str) -> None:
    """An output cube as `thalia-ray predict` writes it, and the whole-frame record that points at it."""
    import xarray as xr

    probability = np.random.default_rng(1).random((2, 3, 24, 24)).astype("float16")
    dims = ("primary_date", "secondary_date", "y", "x")
    xr.Dataset({samples.PROBABILITY: (dims, probability)}).to_zarr(
        str(out / f"{frame_id}.zarr"), zarr_format=3, consolidated=False)
    record.loc.join("whole_frame.json").write_json({"out": str(out), "overall": {"ap": 0.5, "f1": 0.4, "n": 6}})


@pytest.mark.parametrize("task, length", [("classification", 1), ("classification", 3), ("segmentation", 1),
                                          ("segmentation", 2)])
def test_a_run_report_of_every_task_and_length_opens_in_chromium(synthetic_root, tmp_path, task, length):
    store = ExperimentStore(tmp_path / "store")
    record = write_run(store, synthetic_root, "run", task=task, length=length, checkpoint=task == "segmentation")
    if length > 1:
        _predict_output(record, tmp_path / "predicted", "078A_00001_010569")
    page = write_report(store, "run")
    assert page.path == str(tmp_path / "store" / "runs" / "run" / "report" / "index.html")
    text = page.read_text()
    for heading in ("Learning curves", "Test evaluation", "Breakdowns", "Gallery of test samples"):
        assert heading in text
    assert f"time steps (T)</td><td class=\"text\">{length}</td>" in text and ">false_alarms</th>" in text
    metric = "val/f1_deformation" if task == "classification" else "val/iou_deformation"
    assert f"ranked by {metric} (max; the default for {task})" in text  # the leaderboard's choice, named
    assert "the best val/loss (min; train.early_stopping)" in text  # and what chose the tested checkpoint
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    assert text.count('alt="TP ') >= 1 and text.count('alt="FN ') + text.count('alt="FP ') >= 1
    assert "{'" not in text and "the test split has" in text  # counts in words, not a Python dict
    assert ("probability map" in text) == (task == "segmentation")
    if length > 1:
        assert 'alt="map 078A_00001_010569"' in text  # predict's output, found through its whole-frame record
    assert_report_renders(page, min_images=10)


def test_a_series_segmenters_gallery_shows_its_probability_map(synthetic_root, tmp_path):
    """The map comes from the run's best checkpoint, fed the sample as evaluation normalised it."""
    from thalia_ray.predict.inputs import load_model, run_checkpoint

    store = ExperimentStore(tmp_path / "store")
    write_run(store, synthetic_root, "seg", task="segmentation", length=2, checkpoint=True)
    cfg, checkpoint, _ = run_checkpoint(store, "seg")
    rows = store.run("seg").read_predictions("test")[:2]
    shown = samples.read_gallery(cfg, rows, checkpoint)
    assert [s.key for s in shown] == [r["key"] for r in rows]
    sample = shown[0]
    assert sample.phase.shape == (2, 32, 32) and sample.predicted.shape == sample.target.shape == (32, 32)
    assert 0 <= sample.predicted.min() <= sample.predicted.max() <= 1 and len(np.unique(sample.predicted)) > 1
    # What evaluation fed the model: the one crop-and-read path, normalised with the run's statistics.
    import torch

    from thalia_ray.data.cube import crop_rng, get_cache, read_sample
    from thalia_ray.data.index import SampleIndex
    from thalia_ray.data.transforms import finalize
    from thalia_ray.predict.inputs import run_statistics

    index = SampleIndex.from_config(cfg.data, cfg.seed)
    [indexed] = [s for s in index.samples("test") if s.key == sample.key]
    raw = read_sample(indexed, index.annotations, get_cache(cfg.data.root), cfg.data,
                      crop_rng(cfg.data.crop_policy, cfg.seed, indexed.key))
    image = finalize(raw, cfg.data, run_statistics(cfg), None, training=False)["image"]
    with torch.no_grad():
        expected = load_model(cfg, checkpoint).eval()(torch.from_numpy(image)[None])["logits"].softmax(1)[0, 1]
    np.testing.assert_allclose(sample.predicted, expected.numpy(), atol=1e-5)


def test_sweep_report_draws_swept_values_only_learning_rates_on_a_log_axis(synthetic_root, tmp_path):
    from thalia_ray.report.sweeps import _log_scale

    store = ExperimentStore(tmp_path / "store")
    summary = write_sweep(store, synthetic_root, "sw", {"sw-a": {"lr": 1e-3}, "sw-b": {"lr": 3e-4, "val": (0.1,),
                                                                                        "stopped": True}})
    page = write_report(store, "sw", out=tmp_path / "elsewhere")
    assert page.path == str(tmp_path / "elsewhere" / "index.html")
    text = page.read_text()
    assert "stopped after epoch 1" in text and '<tr class="stopped">' in text
    assert ">train.lr</th>" in text and ">seed</th>" not in text  # the seed never varied: no column, no panel
    assert "held constant" in text and "Best trial: a" in text
    assert _log_scale(None, summary["trials"], ["train.lr"]) == ["train.lr"]  # 3.3× apart, still a ratio scale
    assert _log_scale(None, [{"config": {"x": v}} for v in (1, 2)], ["x"]) == []
    assert_report_renders(page, min_images=4)


def test_a_run_kind_gets_its_own_report_from_the_registry(synthetic_root, tmp_path, monkeypatch):
    from thalia_ray.report import runs
    from thalia_ray.report.html import section
    from thalia_ray.store.records import StoreError

    store = ExperimentStore(tmp_path / "store")
    record = write_run(store, synthetic_root, "new-kind")
    status = record.read_status()
    record.loc.join("run.json").write_json({**status, "kind": "distil"})  # a kind this version cannot report
    with pytest.raises(StoreError, match="kind 'distil', which has no report"):
        write_report(store, "new-kind")

    class Distillation:
        def sections(self, store, record):
            return [section(f"Distillation {record.run_id}")]

    monkeypatch.setitem(runs.RUN_REPORTS, "distil", Distillation())
    assert "<h2>Distillation new-kind</h2>" in write_report(store, "new-kind").read_text()


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
    write_run(store, synthetic_root, "r-a", lr=1e-3)
    write_run(store, synthetic_root, "r-b", lr=3e-4, val=(0.2, 0.5))
    write_run(store, synthetic_root, "r-c", lr=0.5, val=(0.2,), stopped=True)  # stopped early: validation only
    assert main(["leaderboard", "--store", str(store.root.path), "--format", "csv"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert frame["run_id"].tolist() == ["r-a", "r-b", "r-c"]  # by each run's best validation F1: 0.6, 0.5, 0.2
    assert frame["ranked_value"].tolist() == [0.6, 0.5, 0.2] and frame["task"].tolist() == ["classification"] * 3
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
    write_run(store, synthetic_root, "r-live", lr=1e-3)
    write_run(store, synthetic_root, "r-dead", lr=0.5, stopped=True)  # validation metrics only
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
