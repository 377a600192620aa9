"""Sweeps: Tune space building, a real ASHA sweep into an S3 store, kill-and-resume, leaderboards, best config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray import tune

from thalia_ray.config import ThaliaConfig, load_config
from thalia_ray.store import ExperimentStore
from thalia_ray.leaderboard import Selection, best_config, collect, differences, leaderboard_text, rank, runs_table
from thalia_ray.tables import render
from thalia_ray.tune import space

SWEEP = {
    "name": "t",
    "search": "grid",
    # Grid order starts both lr=3e-3 trials first, and with two at a time an lr=0.5 trial starts only when
    # one of them has finished: it reaches the first rung behind two sound trials, and as lr=0.5 wrecks a
    # model in two steps, ASHA must stop it (a cut among four sound trials would depend on noise and order).
    "space": {"model.name": {"grid": ["resnet18", "mobilenetv3_small"]}, "train.lr": {"grid": [3e-3, 0.5]}},
    "scheduler": "asha",
    "metric": "val/loss",  # differs between trials even when F1 ties at 0
    "mode": "min",
    "grace_period": 1,
    "reduction_factor": 2,
    "max_concurrent_trials": 2,
}


def sweep_config(root: Path | str, store: str, epochs: int = 3, **extra) -> ThaliaConfig:
    return ThaliaConfig.model_validate({
        "name": "sweeptest",
        "data": {"root": str(root), "crop": 32, "samples_per_read_task": 32},
        "train": {"epochs": epochs, "batch_size": 8, "num_workers": 1, "cpus_per_worker": 0.5,
                  "max_steps_per_epoch": 2, "max_failures": 0},
        "storage": {"store": store},
        "runtime": {"wandb": {"mode": "disabled"}},
        "sweep": {**SWEEP, **extra},
    })


# ----------------------------------------------------------------------------------- pure parts
def test_param_space_grid_seeds_and_optuna_conversion(tmp_path):
    cfg = sweep_config(tmp_path, str(tmp_path), seeds=[0, 1])
    grid = space.param_space(cfg.sweep)
    assert grid["model.name"] == tune.grid_search(["resnet18", "mobilenetv3_small"])
    assert grid["seed"] == tune.grid_search([0, 1])
    optuna = space.param_space(cfg.sweep.model_copy(update={"search": "optuna"}))
    assert optuna["model.name"].categories == ["resnet18", "mobilenetv3_small"]  # grids become choices
    trial = space.trial_config(cfg, {"model.name": "mobilenetv3_small", "train.lr": 1e-5, "seed": 1})
    assert (trial.model.name, trial.train.lr, trial.seed, trial.sweep) == ("mobilenetv3_small", 1e-5, 1, None)
    assert space.varied_fields(cfg.sweep) == ["model.name", "train.lr", "seed"]
    assert space.scheduler(cfg.sweep, cfg.train.epochs)._max_t == 4  # never cuts the final epoch


class _Trial:
    def __init__(self, trial_id: str, **config) -> None:
        self.trial_id, self.config = trial_id, config


def _epoch(epoch: int, f1: float) -> dict:
    return {"epoch": epoch, "train/loss": 0.7, "val/loss": 0.6, "val/f1_deformation": f1, "time/epoch_s": 1.5,
            "time/samples_per_s": 40.0}


def test_sweep_progress_labels_every_epoch_with_its_trial_and_counts_outcomes(capsys):
    import pickle

    from thalia_ray.tune.progress import SweepProgress

    progress = SweepProgress("val/f1_deformation", "max", epochs=2, varied=["model.name", "train.lr"])
    a, b = _Trial("x_00000", **{"model.name": "resnet18", "train.lr": 1e-3}), _Trial("x_00001", **{
        "model.name": "mobilenetv3_small", "train.lr": 3e-4})
    for trial in (a, b):
        progress.on_trial_start(0, [a, b], trial)
    progress.on_trial_result(1, [a, b], a, _epoch(1, 0.4))
    progress.on_trial_result(1, [a, b], b, _epoch(1, 0.5))
    progress.on_trial_complete(2, [a, b], b)  # cut by the scheduler after its first epoch
    progress.on_trial_result(3, [a, b], a, _epoch(2, 0.6))
    progress.on_trial_result(3, [a, b], a, _epoch(2, 0.6))  # a resumed trial's repeat is not shown again
    progress.on_trial_complete(4, [a, b], a)
    lines = capsys.readouterr().out.splitlines()
    epochs = [line for line in lines if "| epoch" in line]
    assert epochs == [
        "trial x_00000 resnet18 lr=0.001 | epoch 1/2  train loss 0.7000  val loss 0.6000  val F1(def) 0.400  1.5s  "
        "40.0 samples/s  *",
        "trial x_00001 mobilenetv3_small lr=0.0003 | epoch 1/2  train loss 0.7000  val loss 0.6000  val F1(def) "
        "0.500  1.5s  40.0 samples/s  *",
        "trial x_00000 resnet18 lr=0.001 | epoch 2/2  train loss 0.7000  val loss 0.6000  val F1(def) 0.600  1.5s  "
        "40.0 samples/s  *"]
    assert lines[lines.index(epochs[1]) + 1].startswith("trial x_00001 mobilenetv3_small lr=0.0003: stopped after "
                                                        "epoch 1")
    assert lines[-1] == "trial x_00000 resnet18 lr=0.001: finished, best val/f1_deformation 0.600"
    assert progress.status() == "1 finished, 1 stopped, best val/f1_deformation 0.600 (x_00000)"
    fresh = pickle.loads(pickle.dumps(progress))  # Tune saves it with the sweep's state
    assert (fresh.metric, fresh.epochs, fresh.varied, fresh.outcome) == ("val/f1_deformation", 2,
                                                                         ["model.name", "train.lr"], {})


def test_a_stopped_trials_stored_epoch_that_tune_never_delivered_is_still_printed(tmp_path, capsys):
    """A trial stores each epoch before reporting it, so a scheduler's stop can leave its last stored epoch
    undelivered: the driver prints it from the store's history when the trial ends."""
    from thalia_ray.tune.progress import SweepProgress

    store = ExperimentStore(tmp_path / "store")
    store.run("sw-x_00000").write_history([_epoch(1, 0.4), _epoch(2, 0.7)])
    progress = SweepProgress("val/f1_deformation", "max", epochs=3, varied=["model.name"], store=store, sweep_id="sw")
    trial = _Trial("x_00000", **{"model.name": "resnet18"})
    progress.on_trial_start(0, [trial], trial)
    progress.on_trial_result(1, [trial], trial, _epoch(1, 0.4))
    progress.on_trial_complete(2, [trial], trial)  # stopped after storing epoch 2, delivered only epoch 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | epoch ")[1].split()[0] for line in lines if " | epoch " in line] == ["1/3", "2/3"]
    assert lines[-1] == ("trial x_00000 resnet18: stopped after epoch 2 (by the scheduler or early stopping), "
                         "best val/f1_deformation 0.700")


def test_the_trials_table_ranks_by_validation_and_fits_a_terminal():
    from thalia_ray.tune.driver import SweepSummary, trials_table

    sweep_id = "demo-backbones-20261207-095558-1488e1"
    summary = SweepSummary(sweep_id, "/store", "val/f1_deformation", "max", trials=[
        {"run_id": f"{sweep_id}-6709d_0000{i}", "config": {"model.name": model, "train.lr": lr}, "status": status,
         "epochs": epochs, "best": best, "test": test}
        for i, (model, lr, status, epochs, best, test) in enumerate([
            ("resnet18", 1e-3, "finished", 3, 0.556, {"test/f1_deformation": 0.9}),
            ("mobilenetv3_small", 1e-3, "stopped", 1, 0.2, {}),
            ("resnet18", 3e-4, "finished", 3, 0.613, {"test/f1_deformation": 0.5}),
            ("mobilenetv3_small", 3e-4, "stopped", 1, None, {})])])
    text = trials_table(summary, ["model.name", "train.lr"], ("test/f1_deformation", "test/auroc_deformation"))
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100, text
    assert lines[1].split() == ["#", "trial", "model.name", "train.lr", "status", "epochs", "best", "val", "F1",
                                "test", "F1", "test", "AUROC"]
    assert [line.split()[1] for line in lines[3:]] == ["6709d_00002", "6709d_00000", "6709d_00001", "6709d_00003"]
    assert lines[3].split()[-3:] == ["0.613", "0.5", "—"]  # ranked by validation, test only reported


def _fake_run(store: ExperimentStore, run_id: str, model: str, lr: float, seed: int, f1: float, sweep: str) -> None:
    cfg = load_config(overrides=[f"model.name={model}", f"train.lr={lr}", f"seed={seed}"])
    record = store.run(run_id)
    record.write_config(cfg)
    record.set_status("running", task="classification", model=model, sweep=sweep)
    record.append_history({"epoch": 1, "val/f1_deformation": f1 - 0.1})
    record.write_results({"test/f1_deformation": f1, "val/f1_deformation": f1 - 0.05}, best_epoch=1)
    record.write_predictions("test", [
        {"key": f"k{i}", "frame_id": "128D_x" if i % 2 else "021D_y", "intensity": "High" if i < 2 else "Low",
         "activity_type": "Sill", "label": int(i < 3), "score": 0.9 if i < 2 else 0.2, "pred": int(i < 2)}
        for i in range(6)
    ])
    record.set_status("finished")


def test_leaderboard_ranks_stored_results_with_seed_spread_and_breakdowns(tmp_path):
    store = ExperimentStore(tmp_path / "store")
    for run_id, model, lr, seed, f1 in [("a", "resnet18", 1e-3, 0, 0.50), ("b", "resnet18", 1e-3, 1, 0.70),
                                       ("c", "mobilenetv3_small", 1e-3, 0, 0.80), ("d", "convnext_atto", 1e-4, 0, 0.10)]:
        _fake_run(store, run_id, model, lr, seed, f1, sweep="s1")
    rows = collect(store, "s1")
    by_f1 = Selection("val/f1_deformation", "max", "a test")
    assert [r.run_id for r in rank(rows, by_f1).rows] == ["c", "b", "a", "d"]  # best validation epoch
    assert [r.run_id for r in rank(rows, Selection("val/f1_deformation", "min", "a test")).rows] == ["d", "a", "b", "c"]
    assert differences(rows) == ["model.name", "train.lr"]  # the seed is shown apart, never as a difference
    text = leaderboard_text(store, "s1", fmt="markdown")
    lines = text.splitlines()
    assert lines[0].startswith("classification: 4 runs ranked by val/f1_deformation (max; each run's best epoch")
    assert lines[4].startswith("| 1 | c |")
    assert "0.600 ± 0.141" in text  # test F1 of resnet18 @ 1e-3 over seeds 0 and 1 (0.5, 0.7)
    assert "0.500 ± 0.141" in text  # and the validation F1 they were ranked by (0.4, 0.6)
    assert "by frame_id" in text and "by intensity" in text
    csv_text = render(runs_table(store, "s1"), "csv")
    assert csv_text.splitlines()[0].startswith(
        "rank,task,run_id,status,sweep,model,model.name,train.lr,seed,ranked_by,ranked_value,test/f1_deformation")
    best = best_config(store, "s1")
    assert best.model.name == "mobilenetv3_small" and best.sweep is None


def test_a_trial_rerun_after_an_interruption_finds_its_finished_run(tmp_path):
    """Tune may re-run a trial that finished just before the driver died; its stored run is reported,
    not trained again, while an unfinished run is trained (resumed) as usual."""
    from thalia_ray.tune.driver import _finished_history

    store = ExperimentStore(tmp_path / "store")
    _fake_run(store, "s-1", "resnet18", 1e-3, 0, 0.5, sweep="s")
    assert _finished_history(store, "s-1") == store.run("s-1").read_history() != []
    store.run("s-2").set_status("running")
    assert _finished_history(store, "s-2") == [] and _finished_history(store, "s-3") == []


@pytest.mark.slow
def test_asha_sweep_writes_every_trial_to_an_s3_store_and_its_best_config_trains(
    ray_cluster, synthetic_root, s3_bucket, tmp_path, capfd
):
    from thalia_ray.report.page import write_report
    from thalia_ray.train.trainer import fit
    from thalia_ray.tune.driver import run_sweep

    from tests.helpers import assert_report_renders, assert_tracked

    cfg = sweep_config(synthetic_root, f"{s3_bucket}/store").with_overrides(
        {"runtime.wandb.mode": "offline", "runtime.tracking": ["wandb", "tensorboard", "mlflow"]})
    summary = run_sweep(cfg)
    out = capfd.readouterr().out
    assert summary.status == "finished" and not summary.errors
    assert len(summary.trials) == 4
    # one labelled line per trial epoch, printed by the driver in order, none merged by Ray's de-duplication
    lines = out.splitlines()
    for trial in summary.trials:
        label = f"trial {trial['run_id'].removeprefix(summary.sweep_id + '-')} "
        shown = [line for line in lines if line.startswith(label) and " | epoch " in line]
        assert [line.split(" | epoch ")[1].split()[0] for line in shown] == [
            f"{e}/3" for e in range(1, trial["epochs"] + 1)], (trial, lines)
    statuses = [t["status"] for t in summary.trials]
    assert "stopped" in statuses, f"ASHA stopped no trial: {summary.trials}"
    assert statuses.count("finished") >= 1
    store = ExperimentStore.of(cfg.storage)
    assert store.sweep(summary.sweep_id).read_summary()["best_run"] == summary.best_run
    families = {store.run(t["run_id"]).read_config().model.name for t in summary.trials}
    assert families == {"resnet18", "mobilenetv3_small"}
    for trial in summary.trials:
        record = store.run(trial["run_id"])
        assert record.read_status()["sweep"] == summary.sweep_id
        assert len(record.read_history()) == trial["epochs"] >= 1
        assert_tracked(record, trial["epochs"], killed=trial["status"] == "stopped")  # from the trial's rank 0
        if trial["status"] == "finished":
            assert "test/f1_deformation" in record.read_results()["metrics"]
    page = write_report(store, summary.sweep_id)
    assert page.url == f"{store.root.url}/sweeps/{summary.sweep_id}/report/index.html"
    assert "stopped after epoch" in page.read_text()
    assert_report_renders(page, min_images=8)
    exported = tmp_path / "best.yaml"
    exported.write_text(best_config(store, summary.sweep_id, metric="val/loss", mode="min").to_yaml())
    retrain = load_config(exported, ["train.epochs=1", f"storage.store={tmp_path / 'retrain'}"])
    assert fit(retrain).test_metrics


def _finished_trials(store: Path) -> list[Path]:
    runs = store / "runs"
    if not runs.exists():
        return []
    return [p for p in runs.iterdir() if (p / "run.json").exists()
            and json.loads((p / "run.json").read_text()).get("status") == "finished"]


@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(synthetic_root, tmp_path):
    store = tmp_path / "store"
    cfg_path = tmp_path / "sweep.yaml"
    # two short trials one at a time: the driver is killed after the first has finished
    rates = [3e-3, 1e-3]
    cfg = sweep_config(synthetic_root, str(store), epochs=2, scheduler="fifo", max_concurrent_trials=1,
                       space={"model.name": {"grid": ["mobilenetv3_small"]}, "train.lr": {"grid": rates}})
    cfg_path.write_text(cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the driver starts its own Ray
    command = [sys.executable, "-m", "thalia_ray.cli", "sweep", str(cfg_path)]
    driver = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _finished_trials(store) and time.time() < deadline and driver.poll() is None:
        time.sleep(2)
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    time.sleep(3)  # let Tune save its experiment state after the trial finished
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = {p.name: (p / "results.json").read_bytes() for p in _finished_trials(store)}
    assert done and len(done) < len(rates)

    resumed = subprocess.run([*command, "--resume", "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(json.loads(resumed.stdout)["trials"]) == len(rates)  # --json: stdout is one JSON document
    finished = _finished_trials(store)
    assert len(finished) == len(rates)
    for name, results in done.items():  # kept as they were: not re-run, not rewritten
        assert (store / "runs" / name / "results.json").read_bytes() == results
    summary = json.loads((next((store / "sweeps").iterdir()) / "summary.json").read_text())
    assert len(summary["trials"]) == len(rates) and summary["status"] == "finished"
