"""Selection on validation everywhere: leaderboards (for people and programs), the best config, the demo's
best run and the sweep report all choose the same run by the sweep's validation metric, never by a test
metric; runs of different tasks are never ranked together."""
from __future__ import annotations

import io
import json

import pandas as pd
import pytest
import yaml

from tests.stores import write_run, write_sweep
from thalia_ray.cli import main
from thalia_ray.errors import ConfigProblem
from thalia_ray.store import ExperimentStore
from thalia_ray.leaderboard import Selection, best_run, rankings

# The validation-best trial is not the test-best one: whoever picks "val" chose on validation.
TRIALS = {
    "sw-val": {"val": (0.3, 0.5, 0.7), "test": 0.4, "lr": 1e-4},
    "sw-test": {"val": (0.3, 0.4, 0.5), "test": 0.8, "lr": 1e-3},
    "sw-late": {"val": (0.2, 0.65, 0.3), "test": 0.6, "lr": 3e-4},  # best epoch 2: ranked by it, not the last
    "sw-stop": {"val": (0.1,), "stopped": True, "lr": 1e-2},
}
ORDER = ["sw-val", "sw-late", "sw-test", "sw-stop"]


@pytest.fixture(scope="module")
def sweep_store(synthetic_root, tmp_path_factory) -> ExperimentStore:
    store = ExperimentStore(tmp_path_factory.mktemp("board") / "store")
    summary = write_sweep(store, synthetic_root, "sw", TRIALS)
    assert summary["best_run"] == "sw-val"  # the Tune driver's own choice
    return store


def _cli(capsys, *args: str) -> str:
    assert main(["leaderboard", *args]) == 0
    return capsys.readouterr().out


def test_every_leaderboard_format_ranks_by_the_sweeps_validation_metric(sweep_store, capsys):
    where = ["sw", "--store", str(sweep_store.root.path)]
    text = _cli(capsys, *where)
    assert "ranked by val/f1_deformation (max; each run's best epoch; the Tune metric of sweep sw)" in text
    assert "never used to rank" in text
    runs = [line.split()[1] for line in text.splitlines()[3:7]]
    assert runs == ORDER
    frame = pd.read_csv(io.StringIO(_cli(capsys, *where, "--format", "csv")))
    assert frame["run_id"].tolist() == ORDER and frame["rank"].tolist() == [1, 2, 3, 4]
    assert frame["ranked_value"].tolist()[:3] == [0.7, 0.65, 0.5]  # each run's best epoch
    assert set(frame["ranked_by"]) == {"val/f1_deformation (max)"}
    assert frame.set_index("run_id").loc["sw-test", "test/f1_deformation"] == 0.8  # shown, not chosen
    rows = json.loads(_cli(capsys, *where, "--format", "json"))
    assert [r["run_id"] for r in rows] == ORDER
    markdown = _cli(capsys, *where, "--format", "markdown")
    assert markdown.splitlines()[4].startswith("| 1 | sw-val |")


def test_best_config_demo_and_sweep_report_pick_the_validation_best(sweep_store, tmp_path, capsys):
    from thalia_ray.report.page import write_report

    from tests.helpers import assert_report_renders

    best = tmp_path / "best.yaml"
    _cli(capsys, "sw", "--store", str(sweep_store.root.path), "--best-config", str(best))
    cfg = yaml.safe_load(best.read_text())
    assert cfg["name"] == "sw-val-best" and cfg["train"]["lr"] == 1e-4 and cfg.get("sweep") is None
    row, selection = best_run(sweep_store, "sw")  # what the demo reports
    assert row.run_id == "sw-val" and selection.metric == "val/f1_deformation"
    page = write_report(sweep_store, "sw")
    text = page.read_text()
    assert "Best trial: val" in text and "Run sw-val" in text
    ranked = [text.index(f'<td class="text">{run_id.removeprefix("sw-")}</td>') for run_id in ORDER]
    assert ranked == sorted(ranked)
    assert "ranked by val/f1_deformation (max; the Tune metric of sweep sw)" in text  # the trial's own page
    assert "held constant</td><td class=\"text\">seed = 0" in text  # a seed that never varied: no panel
    assert_report_renders(page, min_images=10)


def test_a_minimised_sweep_metric_ranks_low_first(synthetic_root, tmp_path, capsys):
    store = ExperimentStore(tmp_path / "store")
    write_sweep(store, synthetic_root, "loss", {"loss-a": {"val": (0.9, 0.2)}, "loss-b": {"val": (0.5, 0.05)}},
                metric="val/ap_deformation", mode="min")
    [ranking] = rankings(store, "loss")
    assert [r.run_id for r in ranking.rows] == ["loss-b", "loss-a"]  # by max, loss-a would lead
    assert ranking.values == [0.025, 0.1]


def test_tasks_are_ranked_apart_and_best_config_asks_for_one(synthetic_root, tmp_path, capsys):
    store = ExperimentStore(tmp_path / "store")
    write_run(store, synthetic_root, "cls-a", val=(0.2, 0.9))
    write_run(store, synthetic_root, "cls-b", val=(0.2, 0.5))
    write_run(store, synthetic_root, "seg-a", task="segmentation", val=(0.1, 0.3))
    write_run(store, synthetic_root, "seg-b", task="segmentation", val=(0.1, 0.6))
    where = ["--store", str(store.root.path)]
    text = _cli(capsys, *where)
    assert "classification: 2 runs ranked by val/f1_deformation" in text
    assert "segmentation: 2 runs ranked by val/iou_deformation" in text
    frame = pd.read_csv(io.StringIO(_cli(capsys, *where, "--format", "csv")))
    assert frame[["task", "rank", "run_id"]].values.tolist() == [
        ["classification", 1, "cls-a"], ["classification", 2, "cls-b"],
        ["segmentation", 1, "seg-b"], ["segmentation", 2, "seg-a"]]
    assert main(["leaderboard", *where, "--best-config", str(tmp_path / "best.yaml")]) == ConfigProblem.exit_code
    captured = capsys.readouterr()
    assert "--task" in captured.err and captured.out == "" and not (tmp_path / "best.yaml").exists()
    _cli(capsys, *where, "--task", "segmentation", "--best-config", str(tmp_path / "best.yaml"))
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["name"] == "seg-b-best"


def test_test_metrics_never_rank(sweep_store, capsys):
    assert main(["leaderboard", "--store", str(sweep_store.root.path), "--metric", "test/f1_deformation"]) == \
        ConfigProblem.exit_code
    assert "validation metrics only" in capsys.readouterr().err
    assert main(["leaderboard", "--store", str(sweep_store.root.path), "--mode", "min"]) == ConfigProblem.exit_code
    assert "--mode min needs --metric" in capsys.readouterr().err
    assert main(["leaderboard", "--store", str(sweep_store.root.path), "--metric", "val/f1_deformaton"]) == \
        ConfigProblem.exit_code  # mistyped: nothing to rank by, an error naming what the runs report
    assert "--metric val/f1_deformaton: no run reports it; they report " in capsys.readouterr().err
    with pytest.raises(ConfigProblem, match="validation"):
        Selection.given("test/auroc_deformation", None)
    assert Selection.given("val/loss", None).mode == "min" and Selection.given("val/ap_deformation", None).mode == "max"
    [ranking] = rankings(sweep_store, "sw", metric="val/loss")
    assert ranking.rows[0].run_id != "sw-stop" and ranking.values[0] == pytest.approx(0.4)  # 1.2 / 3 epochs
