"""Helpers shared by test modules (fixtures live in conftest.py): stored runs, and tracking outputs read
back with each tracker's own reader."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def stored_run(store_dir: Path, data_root: Path, task: str = "segmentation", seed: int = 0,
               **data: Any) -> tuple[Any, str]:
    """A finished run (unet or resnet18, 32-px crop) whose best checkpoint holds the seeded initial
    weights: inference and export read it exactly like a trained one, without minutes of Ray Train."""
    from thalia_ray.bench.predict import untrained_run
    from thalia_ray.config import ThaliaConfig

    cfg = ThaliaConfig.model_validate({
        "name": f"infer-{task}", "seed": seed,
        "data": {"root": str(data_root), "crop": 32, **data},
        "model": {"task": task, "name": "unet" if task == "segmentation" else "resnet18"},
        "train": {"batch_size": 8, "num_workers": 1, "cpus_per_worker": 0.5},
        "storage": {"store": str(store_dir)}, "runtime": {"wandb": {"mode": "disabled"}},
    })
    return untrained_run(str(store_dir), cfg, seed)


def read_tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under `folder`, as (step, value), via TensorBoard."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    series: dict[str, list[tuple[int, float]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in mux.Scalars(run, tag))
    return {tag: sorted(points) for tag, points in series.items()}


def read_mlflow_metrics(folder: Path, run_name: str) -> dict[str, list[tuple[int, float]]]:
    """The metric histories of the MLflow run `run_name` in the file store `folder`, via MLflow's client."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=Path(folder).as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, f"expected one MLflow run named {run_name}, found {len(runs)}"
    run_id = runs[0].info.run_id
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in runs[0].data.metrics}


def assert_report_renders(page, min_images: int = 1) -> None:
    """Open a written report (a storage Location) in headless Chromium: no console errors, every image
    decodes, the screenshot (saved beside the page, in the store) is not blank."""
    import io

    from PIL import Image

    from thalia_ray.report.browser import SCREENSHOT, screenshot_beside

    shot = screenshot_beside(page)  # raises BrowserError naming console errors and undecoded images
    assert shot == page.parent().join(SCREENSHOT)
    pixels = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    low, high = pixels.getextrema()
    assert high - low > 100 and pixels.height > 1000, "the screenshot is blank or cut short"
    assert page.read_text().count("<img ") >= min_images


def assert_tracked(record, epochs: int) -> None:
    """A run's W&B, TensorBoard and MLflow files are in its own store folder (local or S3) and hold every epoch."""
    import tempfile

    from thalia_ray.train.tracking import TRACKING, FolderSync

    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        FolderSync(local, record.loc.join(TRACKING)).restore()  # a copy, wherever the store is
        assert list(local.glob("wandb/offline-run-*/run-*.wandb")), f"no W&B run under {record.loc}"
        history = [row["val/loss"] for row in record.read_history()]
        expected = list(zip(range(1, epochs + 1), history))
        tensorboard = read_tensorboard_scalars(local / "tensorboard")["val/loss"]
        assert [step for step, _ in tensorboard] == list(range(1, epochs + 1))
        assert [v for _, v in tensorboard] == pytest.approx(history, rel=1e-6)  # float32 in event files
        assert read_mlflow_metrics(local / "mlflow", record.run_id)["val/loss"] == expected
