"""Training: the schedule, early stopping and checkpoints as units; 2-worker CPU runs end to end.

The end-to-end runs use the real pipeline on the synthetic dataset, tiny crops and a few steps per
epoch: they check what a run leaves in the store (history, results, predictions), a worker killed
mid-run and replaced, early stopping, and that `evaluate_run` reproduces the stored test metrics.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from thalia_ray.config import ThaliaConfig
from thalia_ray.train.checkpoint import STATE_FILE, load_state, to_checkpoint, unwrap
from thalia_ray.train.loop import EarlyStopping
from thalia_ray.train.schedule import build_scheduler, lr_factor


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


# ------------------------------------------------------------------------------ early stopping
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
def test_classification_run_on_two_cpu_workers_is_stored_and_reproducible(ray_cluster, synthetic_root, tmp_path):
    from thalia_ray.data.pipeline import build_datasets
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.evaluate import evaluate_run
    from thalia_ray.train.trainer import fit

    cfg = _config(synthetic_root, tmp_path / "store").with_overrides({"runtime.wandb.mode": "offline"})
    store = ExperimentStore(cfg.storage.store)
    result = fit(cfg, store=store)
    results = _check_finished_run(store, result, epochs=2)
    test_size = build_datasets(cfg, splits=("test",)).sizes["test"]
    assert len(store.run(result.run_id).read_predictions("test")) == test_size
    assert {"val/loss", "val/f1_deformation", "val/ap_deformation"} <= set(result.val_metrics)
    assert results["epochs"] == 2 and results["restarts"] == 0
    again = evaluate_run(store, result.run_id, split="test")
    assert again == pytest.approx(result.test_metrics, nan_ok=True)


@pytest.mark.slow
def test_deterministic_runs_repeat_exactly(ray_cluster, synthetic_root, tmp_path):
    """train.deterministic: two one-worker runs with one seed give the same history, epoch for epoch."""
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import fit

    cfg = _config(synthetic_root, tmp_path / "store", num_workers=1, deterministic=True, test_best=False,
                  max_steps_per_epoch=3)
    store = ExperimentStore(cfg.storage.store)
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
    store = ExperimentStore(cfg.storage.store)
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
    store = ExperimentStore(cfg.storage.store)
    result = fit(cfg, store=store)
    assert marker.exists()
    record = store.run(result.run_id)
    assert record.read_status()["status"] == "finished"
    assert [h["epoch"] for h in record.read_history()] == [1, 2, 3]  # epoch 1 not repeated
    results = record.read_results()
    assert results["epochs"] == 3 and results["restarts"] == 1
    assert result.test_metrics == {}


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


def test_epoch_line_reports_throughput():
    from thalia_ray.train.loop import progress_line

    metrics = {"epoch": 2, "train/loss": 0.5, "val/loss": 0.25, "val/f1_deformation": 0.75,
               "time/epoch_s": 4.0, "time/samples_per_s": 37.25}
    line = progress_line(metrics, 5, improved=True)
    assert line.startswith("epoch 2/5") and "4.0s  37.2 samples/s  *" in line and "\n" not in line
