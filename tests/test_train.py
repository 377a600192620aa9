"""Training: the schedule, early stopping and checkpoints as units; 2-worker CPU runs end to end.

The end-to-end runs use the real pipeline on the synthetic dataset, tiny crops and a few steps per
epoch: they check what a run leaves in the store (history, results, predictions), a worker killed
mid-run and replaced, early stopping, and that `evaluate_run` reproduces the stored test metrics.
Faults: a killed driver, two drivers on one run id, a store outage and a full disk while checkpointing
each leave a truthful record, and a rerun resumes from the last checkpoint written.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import check_resumed, checkpoint_registered
from thalia_ray.config import ThaliaConfig
from thalia_ray.train.checkpoint import STATE_FILE, load_state, to_checkpoint, unwrap
from thalia_ray.train.loop import EarlyStopping
from thalia_ray.train.schedule import build_scheduler, lr_factor
from thalia_ray.train.step import build_optimizer, clear_gradients, optimizer_step


# ------------------------------------------------------------------------------ schedule
def test_warmup_then_cosine_reaches_zero_at_the_last_step():
    factors = [lr_factor(s, total_steps=20, warmup_steps=4, kind="cosine") for s in range(21)]
    assert factors[:5] == sorted(factors[:5]) and factors[0] > 0  # rises during warm-up
    assert factors[4] == pytest.approx(1.0)  # peak right after warm-up
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))  # then only decays
    assert factors[12] == pytest.approx(0.5)  # half-way through the decay
    assert factors[20] == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_keeps_the_peak_after_warmup():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_scheduler_steps_the_optimiser_learning_rate():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = build_scheduler(optimizer, "cosine", total_steps=10, warmup_fraction=0.2)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[2] == pytest.approx(0.1)
    assert seen[0] < seen[1] < seen[2] > seen[5] > seen[9]
    with pytest.raises(ValueError, match="at least one optimiser step"):
        build_scheduler(optimizer, "cosine", total_steps=0, warmup_fraction=0.1)


def _rates_seen(optimizer: torch.optim.Optimizer, steps: list[int], after_step) -> list[float]:
    """The rate each step of epochs of `steps` steps runs at, `after_step(epoch, idx)` being called
    after each optimiser step (0-based epoch and step)."""
    seen = []
    for epoch, n in enumerate(steps):
        for idx in range(n):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            after_step(epoch, idx)
    return seen


def test_the_vit_preset_warms_up_as_the_references_timm_scheduler_steps():
    """The reference's ViT run: timm's CosineLRScheduler(t_initial=epochs·2725, warmup_t=5·2725,
    warmup_lr_init=1e-6, lr_min=1e-5 = lr, t_in_epochs=False), stepped with step_update(epoch·2725 + idx)
    after each step (training/train_supervised.py), over epochs shorter than 2725 steps and of varying
    length (RandomMix). The preset's schedule gives the same rate at every step."""
    from timm.scheduler import CosineLRScheduler

    from thalia_ray.config import load_config
    from thalia_ray.train.schedule import anchor, epoch_steps, run_scheduler

    train = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper" / "cls-series-vit.yaml").train
    steps = [700, 650, 720, 690, 705, 680, 700, 710]  # real steps per epoch, < 2725
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    timm = CosineLRScheduler(reference_opt, t_initial=train.epochs * 2725, warmup_t=2725 * 5, warmup_lr_init=1e-6,
                             lr_min=1e-5, t_in_epochs=False)
    reference = _rates_seen(reference_opt, steps, lambda epoch, idx: timm.step_update(epoch * 2725 + idx))

    ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = run_scheduler(ours_opt, train, steps_per_epoch=max(steps))
    per_epoch = epoch_steps(train, max(steps))

    def after_step(epoch: int, idx: int) -> None:
        scheduler.step()
        if idx == steps[epoch] - 1:  # the loop anchors each epoch's start
            anchor(scheduler, (epoch + 1) * per_epoch)

    ours = _rates_seen(ours_opt, steps, after_step)
    assert ours == pytest.approx(reference, rel=1e-12, abs=1e-18)
    first_of_sixth = sum(steps[:5])  # epoch 6 starts at the rate of epoch 5's last position, then is flat
    assert reference[0] == reference[1] == 1e-6 and max(reference[:first_of_sixth + 1]) < 1e-5
    assert set(reference[first_of_sixth + 1:]) == {1e-5}

    smooth = train.model_copy(update={"schedule_epoch_steps": None})  # real steps: a 5-epoch ramp
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    ramp_scheduler = run_scheduler(opt, smooth, steps_per_epoch=700)
    ramp = _rates_seen(opt, [700] * 6, lambda epoch, idx: ramp_scheduler.step())
    assert ramp[0] == 1e-6 and all(a <= b for a, b in zip(ramp, ramp[1:]))
    assert ramp[5 * 700] < 1e-5 and ramp[5 * 700 + 1:] == pytest.approx([1e-5] * (700 - 1))


def test_warmup_length_and_start_are_validated():
    from thalia_ray.config import TrainConfig

    with pytest.raises(ValueError, match="both set the warm-up"):
        TrainConfig(warmup_epochs=2, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="must be below train.lr"):
        TrainConfig(warmup_start_lr=1e-3, lr=1e-4)


# ------------------------------------------------------------------------------ early stopping
def _two_steps(grad_reset: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    train = ThaliaConfig(train={"grad_reset": grad_reset, "grad_clip": None}).train
    optimizer, scaler = build_optimizer(model, train), torch.amp.GradScaler("cuda", enabled=False)
    clear_gradients(optimizer)  # the loop's start of an epoch
    for x in (torch.ones(4, 3), torch.full((4, 3), -2.0)):
        optimizer_step(model(x).square().mean(), model, optimizer, scaler, train)
    return [p.detach().clone() for p in model.parameters()]


def _reference_two_steps(clear_each_step: bool) -> list[torch.Tensor]:
    """A literal transcription of the reference's train_epoch: grads set to None once, then per batch
    backward and AdamW step (lr 1e-4 and weight decay 1e-4 are our defaults, used on both sides)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    for param in model.parameters():
        param.grad = None
    for x in (torch.ones(4, 3), torch.full((4, 3), -2.0)):
        if clear_each_step:
            optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_grad_reset_epoch_accumulates_gradients_as_the_reference_does():
    per_epoch, per_step = _two_steps("epoch"), _two_steps("step")
    for ours, reference in zip(per_epoch, _reference_two_steps(clear_each_step=False)):
        assert torch.equal(ours, reference)
    for ours, reference in zip(per_step, _reference_two_steps(clear_each_step=True)):
        assert torch.equal(ours, reference)
    assert any(not torch.equal(a, b) for a, b in zip(per_epoch, per_step))  # the two rules really differ


def test_a_failure_a_user_can_act_on_becomes_one_error_of_its_kind(tmp_path):
    from ray.train import WorkerGroupError

    from thalia_ray.errors import StorageProblem, StoreProblem
    from thalia_ray.store import ExperimentStore
    from thalia_ray.store.records import StoreError
    from thalia_ray.train.trainer import user_problem

    record = ExperimentStore(tmp_path / "store").run("r1")
    in_worker = WorkerGroupError("rank 0 failed", {0: StoreError("cannot write history.json")})
    problem = user_problem(in_worker, record)
    assert type(problem) is StoreProblem  # the kind of what the worker raised, with its exit status
    assert str(problem).startswith("run r1 stopped: cannot write history.json (the run's records and checkpoints "
                                   f"are in {record.loc.url}: rerun with --run-id r1")
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as disk:
            raise RuntimeError("checkpoint upload failed") from disk
    except RuntimeError as wrapped:
        disk_full = user_problem(WorkerGroupError("rank 0 failed", {0: wrapped}), record)
    assert isinstance(disk_full, StorageProblem) and "[Errno 28] No space left on device" in str(disk_full)
    assert user_problem(WorkerGroupError("bug", {0: ZeroDivisionError("x")}), record) is None  # not the user's
    assert user_problem(StoreError("already one line"), record) is None  # raised as it is


def test_early_stopping_counts_epochs_without_improvement():
    stopper = EarlyStopping(mode="min", patience=2)
    assert stopper.update(1.0, 1) and not stopper.should_stop
    assert not stopper.update(1.5, 2) and not stopper.should_stop
    assert stopper.update(0.5, 3) and stopper.bad_epochs == 0
    assert not stopper.update(float("nan"), 4)  # NaN never counts as an improvement
    assert not stopper.update(0.5, 5) and stopper.should_stop  # equal is not better
    assert (stopper.best, stopper.best_epoch) == (0.5, 3)


def test_early_stopping_in_max_mode_and_disabled():
    stopper = EarlyStopping(mode="max", patience=None)
    for epoch, value in enumerate([0.1, 0.3, 0.2, 0.2, 0.2], start=1):
        stopper.update(value, epoch)
    assert stopper.best_epoch == 2 and stopper.bad_epochs == 3 and not stopper.should_stop


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_restores_training_state_without_pickles():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = build_scheduler(optimizer, "cosine", 10, 0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "progress": {"epoch": 3, "history": [{"val/loss": 0.5}]}}
    checkpoint, tmp = to_checkpoint(state)
    with tmp:
        assert (Path(checkpoint.path) / STATE_FILE).is_file()
        loaded = load_state(checkpoint)
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    assert loaded["progress"] == {"epoch": 3, "history": [{"val/loss": 0.5}]}
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.01)
    fresh_scheduler = build_scheduler(fresh, "cosine", 10, 0.1)
    fresh.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    assert fresh_scheduler.last_epoch == 1
    assert fresh.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_unwrap_returns_the_bare_model():
    model = torch.nn.Linear(2, 2)
    assert unwrap(model) is model


# ------------------------------------------------------------------------------ end to end
def _config(root: Path, store: Path, task: str = "classification", **train) -> ThaliaConfig:
    return ThaliaConfig.model_validate({
        "name": f"test-{task}",
        "data": {"root": str(root), "crop": 32, "samples_per_read_task": 32},
        "model": {"task": task, "name": "resnet18" if task == "classification" else "unet"},
        "train": {"epochs": 2, "batch_size": 8, "num_workers": 2, "cpus_per_worker": 0.5,
                  "max_steps_per_epoch": 2, "lr": 1e-3, "max_failures": 0, **train},
        "storage": {"store": str(store)},
        "runtime": {"wandb": {"mode": "disabled"}},
    })


def _check_finished_run(store, result, epochs: int) -> dict:
    record = store.run(result.run_id)
    assert record.read_status()["status"] == "finished"
    history = record.read_history()
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert all(math.isfinite(h["train/loss"]) and math.isfinite(h["val/loss"]) for h in history)
    results = record.read_results()
    assert results["best_epoch"] == result.best_epoch and results["best_checkpoint"] == result.checkpoint
    assert results["metrics"]["test/f1_deformation"] == result.test_metrics["test/f1_deformation"]
    predictions = record.read_predictions("test")
    assert {p["pred"] for p in predictions} <= {0, 1} and all(0 <= p["score"] <= 1 for p in predictions)
    assert len({p["key"] for p in predictions}) == len(predictions)  # every test sample once
    return results


@pytest.mark.slow
def test_classification_run_on_two_cpu_workers_is_stored_and_reproducible(ray_cluster, synthetic_root, tmp_path,
                                                                          capsys):
    """`thalia-ray train --json` on 2 workers: records, every tracker's files and the report land in the store."""
    from types import SimpleNamespace

    from thalia_ray.cli import main
    from thalia_ray.data.pipeline import build_datasets
    from thalia_ray.report.page import write_report
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.evaluate import evaluate_run

    from tests.helpers import assert_report_renders, assert_tracked

    cfg = _config(synthetic_root, tmp_path / "store").with_overrides(
        {"runtime.wandb.mode": "offline", "runtime.tracking": ["wandb", "tensorboard", "mlflow"]})
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    assert main(["train", str(tmp_path / "run.yaml"), "--json"]) == 0
    result = SimpleNamespace(**json.loads(capsys.readouterr().out))
    store = ExperimentStore.of(cfg.storage)
    results = _check_finished_run(store, result, epochs=2)
    assert_tracked(store.run(result.run_id), epochs=2)
    assert_report_renders(write_report(store, result.run_id), min_images=6)
    test_size = build_datasets(cfg, splits=("test",)).sizes["test"]
    assert len(store.run(result.run_id).read_predictions("test")) == test_size
    assert {"val/loss", "val/f1_deformation", "val/ap_deformation"} <= set(result.val_metrics)
    assert results["epochs"] == 2 and results["restarts"] == 0
    assert store.run(result.run_id).read_skipped() == [] and result.skipped == 0  # recorded, none skipped
    assert main(["runs", "show", result.run_id, "--store", str(cfg.storage.store)]) == 0
    assert "skipped   0 samples" in capsys.readouterr().out.splitlines()
    again = evaluate_run(store, result.run_id, split="test")
    assert again.metrics == pytest.approx(result.test_metrics, nan_ok=True) and again.skipped == 0


@pytest.mark.slow
def test_evaluate_records_the_samples_it_skips_beside_trainings(ray_cluster, tmp_path, capsys):
    """A test cube loses a chunk after training: `thalia-ray evaluate` skips that sample, lists it in the
    run's skipped.json as its own (split, origin, key, reason), counts it in its summary line, its JSON and
    `runs show`, keeps training's rows, and a second evaluation replaces its rows instead of adding to them."""
    from thalia_ray.cli import main
    from thalia_ray.data.index import SampleIndex

    from tests.helpers import build_root, delete_pair_chunks, stored_run

    root = build_root(tmp_path / "root")
    store, run_id = stored_run(tmp_path / "store", root, task="classification")
    record = store.run(run_id)
    trainings = {"epoch": 2, "split": "train", "origin": "x.zarr", "key": "x/1", "reason": "as training left it"}
    record.write_skipped([trainings])
    cfg = record.read_config()
    victim = SampleIndex.from_config(cfg.data, cfg.seed).samples("test")[0]
    delete_pair_chunks(root, victim)
    where = str(tmp_path / "store")

    assert main(["evaluate", run_id, "--store", where]) == 0
    lines = capsys.readouterr().out.splitlines()
    n_test = len(SampleIndex.from_config(cfg.data, cfg.seed).samples("test"))
    assert lines[-1] == (f"run {run_id} evaluated on test: 1 samples skipped, metrics over {n_test - 1} of {n_test} "
                         f"samples (store {store.root.url})")
    assert any(line.split()[0] == "test/f1_deformation" for line in lines[:-1])
    rows = record.read_skipped()
    assert rows[0] == {"command": "train", **trainings}  # training's row kept
    (row,) = rows[1:]
    assert (row["command"], row["split"], row["key"], row["epoch"]) == ("evaluate", "test", victim.key, None)
    assert row["origin"].endswith(f"{victim.frame_id}.zarr") and "never written" in row["reason"]

    assert main(["evaluate", run_id, "--store", where, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 1 and summary["split"] == "test" and "test/f1_deformation" in summary["metrics"]
    assert (summary["metrics"]["test/n_evaluated"], summary["metrics"]["test/n_expected"]) == (n_test - 1, n_test)
    # evaluated again: replaced, not added (the reason names whichever of the pair's deleted chunks
    # Zarr's concurrent chunk reads met first, so it is compared by what it says, not word for word)
    again = record.read_skipped()
    assert again[0] == rows[0] and len(again) == 2
    assert {k: v for k, v in again[1].items() if k != "reason"} == {k: v for k, v in row.items() if k != "reason"}
    assert "never written" in again[1]["reason"]
    assert main(["runs", "show", run_id, "--store", where]) == 0
    assert "skipped   2 samples (train 1, evaluate test 1)" in capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_deterministic_runs_repeat_exactly(ray_cluster, synthetic_root, tmp_path):
    """train.deterministic: two one-worker runs with one seed give the same history, epoch for epoch."""
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import fit

    cfg = _config(synthetic_root, tmp_path / "store", num_workers=1, deterministic=True, test_best=False,
                  max_steps_per_epoch=3)
    store = ExperimentStore.of(cfg.storage)
    runs = [store.run(fit(cfg, store=store).run_id).read_history() for _ in range(2)]
    keys = ("train/loss", "val/loss", "val/ap_deformation")
    assert [[h[k] for k in keys] for h in runs[0]] == [[h[k] for k in keys] for h in runs[1]]
    assert runs[0][0]["train/loss"] != runs[0][1]["train/loss"]  # it did train: the loss moved


@pytest.mark.slow
def test_segmentation_run_with_early_stopping(ray_cluster, synthetic_root, tmp_path):
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import fit

    # "epoch" in min mode never improves after epoch 1: with patience 1 the run stops after epoch 2 of 4.
    cfg = _config(synthetic_root, tmp_path / "store", "segmentation", epochs=4,
                  early_stopping={"metric": "epoch", "mode": "min", "patience": 1})
    store = ExperimentStore.of(cfg.storage)
    result = fit(cfg, store=store)
    results = _check_finished_run(store, result, epochs=2)
    assert result.best_epoch == 1 and results["epochs"] == 2
    assert "test/iou_deformation" in result.test_metrics


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(
    ray_cluster, synthetic_root, tmp_path, monkeypatch
):
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import FAULT_ENV, fit

    marker = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_ENV, f"1:2:{marker}")  # rank 1 exits at the start of epoch 2, once
    cfg = _config(synthetic_root, tmp_path / "store", epochs=3, max_failures=1, test_best=False)
    store = ExperimentStore.of(cfg.storage)
    result = fit(cfg, store=store)
    assert marker.exists()
    record = store.run(result.run_id)
    assert record.read_status()["status"] == "finished"
    assert [h["epoch"] for h in record.read_history()] == [1, 2, 3]  # epoch 1 not repeated
    results = record.read_results()
    assert results["epochs"] == 3 and results["restarts"] == 1
    assert result.test_metrics == {}


@pytest.mark.slow
def test_a_run_names_and_records_what_its_index_and_epochs_leave_out(ray_cluster, synthetic_root, tmp_path):
    """Two positive annotations with an intensity the vocabulary lacks: training goes on without them, says
    so in its summary, and records them beside the run with what each epoch leaves out."""
    import shutil

    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import fit

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    records = json.loads((root / "annotations.json").read_text())
    changed = [k for k, r in records.items() if "Non_Deformation" not in r["label"]][:2]
    for key in changed:
        records[key]["intensity_level"] = ["Extreme"]
    (root / "annotations.json").write_text(json.dumps(records))
    cfg = _config(root, tmp_path / "store", epochs=1, num_workers=1, test_best=False)
    store = ExperimentStore.of(cfg.storage)
    result = fit(cfg, store=store, run_id="lo")
    line = str(result)  # other parts (e.g. evaluation shortfalls) may stand between these two
    assert result.left_out == 2 and ", 0 samples skipped, " in line and ", 2 left out of the index (store " in line
    left_out = store.run("lo").read_left_out()
    assert sorted(row["key"] for row in left_out["index"]) == sorted(changed)
    assert all(row["reason"].startswith("field 'intensity_level': unknown value(s) ['Extreme']") and row["positive"]
               for row in left_out["index"])
    train = left_out["epochs"]["train"]
    assert 0 < train["used"] < train["drawn"] == train["used"] + sum(train["left_out"].values())


def test_train_summary_line_counts_skipped_samples():
    from thalia_ray.train.trainer import TrainResult

    result = TrainResult("r1", 2, {"val/f1_deformation": 0.5, "val/loss": 0.25}, {"test/f1_deformation": 0.75},
                         "ckpt", "file:///store", skipped=3)
    assert str(result) == ("run r1: best epoch 2, val/f1_deformation 0.500, test/f1_deformation 0.750, "
                           "3 samples skipped (store file:///store)")


def test_train_summary_line_says_which_metrics_miss_samples():
    from thalia_ray.train.trainer import TrainResult

    val = {"val/f1_deformation": 0.5, "val/n_evaluated": 10, "val/n_expected": 10}
    test = {"test/f1_deformation": 0.75, "test/n_evaluated": 98, "test/n_expected": 100}
    assert str(TrainResult("r1", 2, val, test, "ckpt", "file:///store", skipped=2)) == (
        "run r1: best epoch 2, val/f1_deformation 0.500, test/f1_deformation 0.750, 2 samples skipped, "
        "test metrics over 98 of 100 samples (store file:///store)")
    val["val/n_evaluated"] = 8  # e.g. two workers' equal split of 10 - 1 samples, or a step cap
    assert ", val metrics over 8 of 10 samples, test metrics over 98 of 100 samples (" in str(
        TrainResult("r1", 2, val, test, "ckpt", "file:///store", skipped=2))


def test_an_evaluation_reports_how_many_of_the_splits_samples_it_covers():
    from thalia_ray.train.evaluate import Evaluation

    result = Evaluation(loss_sum=3.0, count=3, metrics={"f1_deformation": 0.5}, expected=4)
    assert result.flat("test") == {"test/loss": 1.0, "test/f1_deformation": 0.5, "test/n_evaluated": 3,
                                   "test/n_expected": 4}


def test_what_each_epoch_leaves_out_is_counted_with_the_reason(tmp_path):
    from thalia_ray.train.trainer import EpochUse, epoch_use

    cfg = _config(tmp_path, tmp_path / "store", max_steps_per_epoch=2)  # 2 workers, batch 8
    use = epoch_use(cfg, {"train": 51, "val": 9}, steps=2)
    assert use["train"] == EpochUse(51, 32, {"Ray's equal split over 2 workers": 1, "the last partial batch of 8": 2,
                                             "train.max_steps_per_epoch=2": 16})
    assert use["val"] == EpochUse(9, 8, {"Ray's equal split over 2 workers": 1})
    assert use["train"].describe("train", "trains on") == (
        "train trains on 32 of 51 samples drawn (Ray's equal split over 2 workers ×1, the last partial batch of 8 ×2, "
        "train.max_steps_per_epoch=2 ×16)")
    exact = epoch_use(cfg.with_overrides({"train.max_steps_per_epoch": None}), {"train": 48, "val": 8}, steps=3)
    assert exact == {"train": EpochUse(48, 48, {}), "val": EpochUse(8, 8, {})}
    assert exact["val"].describe("val", "validates") == "val validates all 8 samples drawn"


def test_steps_per_epoch_follows_the_equal_split_and_the_cap(tmp_path):
    from thalia_ray.train.trainer import steps_per_epoch

    cfg = _config(tmp_path, tmp_path / "store", max_steps_per_epoch=None)  # 2 workers, batch 8
    assert steps_per_epoch(cfg, {"train": 50, "val": 9}) == 3  # 25 rows per worker → 3 full batches
    capped = cfg.with_overrides({"train.max_steps_per_epoch": 2})
    assert steps_per_epoch(capped, {"train": 50, "val": 9}) == 2
    with pytest.raises(ValueError, match="too few for one batch"):
        steps_per_epoch(cfg, {"train": 15, "val": 9})
    with pytest.raises(ValueError, match="fewer than train.num_workers=2"):
        steps_per_epoch(cfg, {"train": 50, "val": 1})


# ------------------------------------------------------------------------------ faults
# The killed driver is a real `thalia-ray train` process; the other faults hit a driver in this process
# (the session's Ray), which sees the same errors and leaves the same records.
def _tiny(root: Path, store: str | Path, tmp_path: Path, **storage) -> ThaliaConfig:
    from tests.helpers import tiny_train_config
    from thalia_ray.config import load_config

    return load_config(tiny_train_config(tmp_path / "run.yaml", root, store, model="mobilenetv3_small",
                                         storage=storage, epochs=4))


def _epochs(record) -> int:
    try:
        return len(record.read_history())
    except Exception:  # noqa: BLE001 - the store may be away: not there yet
        return 0


@pytest.mark.slow
def test_one_run_id_has_one_writer_and_a_killed_driver_is_marked_then_resumed(ray_cluster, synthetic_root, tmp_path):
    from tests.helpers import cli, cli_driver, kill_after_checkpoint, wait_for
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.store.records import RunBusyError
    from thalia_ray.train.trainer import fit

    cfg = _tiny(synthetic_root, tmp_path / "store", tmp_path)
    store = ExperimentStore(tmp_path / "store")
    record = store.run("dup")
    log = tmp_path / "driver.log"
    with cli_driver(["train", str(tmp_path / "run.yaml"), "--run-id", "dup"], log) as driver:
        wait_for(lambda: record.read_lease() or driver.poll() is not None, 300, "the driver's lease")
        with pytest.raises(RunBusyError, match=f"run dup is already being written by pid {driver.pid} on"):
            fit(cfg, store=store, run_id="dup")
        # A checkpoint registered (so an epoch is in the history too); then the driver is killed.
        kill_after_checkpoint(driver, store, "dup", log)
    assert record.read_status()["status"] == "running"  # nothing could record the kill...
    shown = cli(["runs", "show", "dup", "--store", str(tmp_path / "store")])
    assert "status    interrupted" in shown.stdout and f"pid {driver.pid}" in shown.stdout  # ...until looked at
    fit(cfg, store=store, run_id="dup")
    check_resumed(record, epochs=4)


def _fit_until_fault(cfg: ThaliaConfig, store, run_id: str, fault) -> BaseException:
    """Run `fit` while a thread calls `fault()` once a checkpoint is registered; return what `fit` raised."""
    import threading

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.3):
            if checkpoint_registered(store, run_id):
                fault()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        from thalia_ray.train.trainer import fit

        with pytest.raises(Exception) as err:  # noqa: PT011 - whatever the fault raises, checked by the caller
            fit(cfg, store=store, run_id=run_id)
    finally:
        stop.set()
        watcher.join()
    return err.value


@pytest.mark.slow
def test_a_store_outage_ends_the_run_and_a_rerun_resumes_from_its_last_checkpoint(
    ray_cluster, synthetic_root, tmp_path, s3_bucket, moto_endpoint
):
    from tests.helpers import CuttableProxy
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import fit

    proxy = CuttableProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    cfg = _tiny(synthetic_root, f"{s3_bucket}/store", tmp_path, endpoint_url=proxy.url, timeout_s=5)
    store = ExperimentStore.of(cfg.storage)
    record = store.run("outage")
    try:
        _fit_until_fault(cfg, store, "outage", proxy.cut)
    finally:
        proxy.cut()
    proxy.restore()
    assert store.reconcile_runs() == ["outage"] or record.read_status()["status"] == "failed"
    assert record.read_status()["status"] in ("failed", "interrupted") and record.read_status()["error"]
    assert _epochs(record) < 4
    fit(cfg, store=store, run_id="outage")
    check_resumed(record, epochs=4)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_fails_the_run_and_a_rerun_resumes(
    ray_cluster, synthetic_root, tmp_path, small_disk
):
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.checkpoint import STATE_FILE
    from thalia_ray.ray_internals import TRAIN_SNAPSHOT as RAY_SNAPSHOT
    from thalia_ray.train.trainer import fit

    from tests.helpers import cli
    from thalia_ray.errors import StorageProblem

    cfg = _tiny(synthetic_root, small_disk / "store", tmp_path)
    store = ExperimentStore.of(cfg.storage)
    record = store.run("full")
    failed = cli(["train", str(tmp_path / "run.yaml"), "--run-id", "full"], timeout=600)
    # One line a user can act on (the disk, the path, how to go on), the storage kind's status, no traceback.
    assert failed.returncode == StorageProblem.exit_code, failed.stderr[-3000:]
    ours = [line for line in failed.stderr.splitlines() if line.startswith("thalia-ray: ")]
    assert len(ours) == 1, failed.stderr[-3000:]  # Ray may still print after it; the error is one line
    last = ours[0]
    assert last.startswith("thalia-ray: run full stopped"), failed.stderr[-3000:]
    assert "No space left on device" in last and str(small_disk / "store") in last and "--run-id full" in last
    assert "Traceback" not in failed.stderr
    store.reconcile_runs()
    status = record.read_status()
    assert status["status"] in ("failed", "interrupted") and status["error"]
    assert 1 <= _epochs(record) < 4
    # Nothing half-written where a reader looks: the records parse, and the checkpoints Ray registered load.
    for name in ("run.json", "history.json", "config.yaml"):
        assert record.loc.join(name).read_text().strip()
    # Ray's controller registers a reported checkpoint at its next poll (every 2 s), writing its snapshot
    # then. These epochs take under a second, so the disk may already be full by then: the snapshot is
    # not written and the rerun starts over. Either way the snapshot is never half-written.
    ray_run = small_disk / "store" / "ray" / "full"
    snapshot = ray_run / RAY_SNAPSHOT
    registered = ([ray_run / r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
                  if snapshot.exists() else [])
    for checkpoint in registered:
        torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)  # space freed
    fit(cfg, store=store, run_id="full")
    assert record.read_status()["status"] == "finished"
    assert [h["epoch"] for h in record.read_history()] == [1, 2, 3, 4]
    assert record.read_results()["restarts"] == (1 if registered else 0)


def test_a_damaged_ray_snapshot_is_refused_by_name_before_training(synthetic_root, tmp_path):
    from thalia_ray.errors import StoreProblem
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.ray_internals import TRAIN_SNAPSHOT as RAY_SNAPSHOT
    from thalia_ray.train.trainer import check_ray_snapshot, fit

    cfg = _tiny(synthetic_root, tmp_path / "store", tmp_path)
    store = ExperimentStore.of(cfg.storage)
    check_ray_snapshot(store, "old")  # nothing to resume from: a new run
    snapshot = tmp_path / "store" / "ray" / "old" / RAY_SNAPSHOT
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text('{"checkpoint_results": []}')
    check_ray_snapshot(store, "old")
    snapshot.write_text("")  # what Ray 2.60 leaves when the disk fills while it writes the file
    with pytest.raises(StoreProblem, match=f"run old cannot resume: .*{snapshot}, is damaged") as refused:
        fit(cfg, store=store, run_id="old")
    assert "delete that file" in str(refused.value)
    assert store.run("old").read_status()["status"] == "failed"
    assert snapshot.read_text() == ""  # left for the user to look at


def test_epoch_line_reports_throughput():
    from thalia_ray.progress import progress_line

    metrics = {"epoch": 2, "train/loss": 0.5, "val/loss": 0.25, "val/f1_deformation": 0.75,
               "time/epoch_s": 4.0, "time/samples_per_s": 37.25}
    line = progress_line(metrics, 5, improved=True)
    assert line.startswith("epoch 2/5") and "4.0s  37.2 samples/s  *" in line and "\n" not in line
