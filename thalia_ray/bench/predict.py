"""The predict benchmark: whole-frame throughput of the Ray Data job against the model's own forward rate.

The ceiling is the same model running the same number of windows on resident random tensors in
this process, with every usable core: no reads, no normalisation, no blending, no writes. Both are
reported in frames (units) per second per core. The driver's peak RSS is sampled while the job
runs over part of the units and over all of them: it should not grow with the number of frames.
"""
from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from thalia_ray.bench.harness import Rep
from thalia_ray.config import ThaliaConfig
from thalia_ray.store.layout import ExperimentStore


def untrained_run(store_dir: str, cfg: ThaliaConfig, seed: int = 0) -> tuple[ExperimentStore, str]:
    """A finished run record as `fit` leaves it, holding the model's seeded initial weights: what
    inference and export read, without the minutes of a training run."""
    from thalia_ray.train.checkpoint import save_state
    from thalia_ray.train.evaluate import model_from_config

    store = ExperimentStore(store_dir)
    run_id = store.new_run_id(cfg.name)
    record = store.run(run_id)
    record.write_config(cfg)
    record.set_status("finished", task=cfg.model.task, model=cfg.model.name)
    torch.manual_seed(seed)
    model = model_from_config(cfg)
    checkpoint = Path(store_dir) / "ray" / run_id / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    save_state({"model": model.state_dict(), "progress": {"epoch": 1}}, checkpoint)
    record.write_results({}, best_epoch=1, best_checkpoint=str(checkpoint))
    return store, run_id


@dataclass(frozen=True)
class PredictSetup:
    root: str
    length: int
    crop: int
    model: str
    batch_size: int
    actors: int
    actor_cpus: float
    overlap: float = 0.25

    def config(self, store: str) -> ThaliaConfig:
        return ThaliaConfig.model_validate({
            "name": f"bench-predict-T{self.length}",
            "data": {"root": self.root, "length": self.length, "crop": self.crop},
            "model": {"task": "segmentation", "name": self.model},
            "train": {"batch_size": self.batch_size, "cpus_per_worker": self.actor_cpus, "device": "cpu"},
            "storage": {"store": store}, "runtime": {"wandb": {"mode": "disabled"}},
        })


class PeakRss:
    """Samples this process's resident memory in a thread; `peak_mib` once stopped."""

    def __init__(self, every_s: float = 0.05) -> None:
        import psutil

        self.process, self.every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def predict_rep(store: ExperimentStore, run_id: str, setup: PredictSetup, frames: Sequence[str] | None,
                cores: int) -> Rep:
    """One job over `frames` into a fresh output: units per second per core, and the driver's peak RSS."""
    from thalia_ray.predict.job import PredictOptions, predict

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as out, PeakRss() as rss:
        options = PredictOptions(data=setup.root, out=out, frames=frames, overlap=setup.overlap,
                                 actors=setup.actors, progress=False)
        start = time.perf_counter()
        report = predict(store, run_id, options)
        seconds = time.perf_counter() - start
    if report.failed or not report.written:
        raise RuntimeError(f"bench predict: {report.summary()}")
    extra = {"units": report.written, "peak_rss_mib": rss.peak_mib, "steady": float("nan")}
    if report.first_unit_s is not None and report.written > 1 and report.seconds > report.first_unit_s:
        extra["steady"] = (report.written - 1) / (report.seconds - report.first_unit_s) / cores  # after the first unit
    return Rep(report.written / seconds / cores, seconds, extra)


def ceiling_rep(setup: PredictSetup, cfg: ThaliaConfig, units: int, windows_per_unit: int, cores: int) -> Rep:
    """The model alone over as many resident windows as the job runs, batched alike, with `cores` threads."""
    from thalia_ray.train.evaluate import model_from_config

    torch.set_num_threads(cores)
    model = model_from_config(cfg).eval()
    depth = setup.length * len(cfg.data.channels)
    batch = torch.from_numpy(np.random.default_rng(0).normal(size=(setup.batch_size, depth, setup.crop, setup.crop))
                             .astype(np.float32))
    total = units * windows_per_unit
    start = time.perf_counter()
    with torch.inference_mode():
        for done in range(0, total, setup.batch_size):
            model(batch[:min(setup.batch_size, total - done)])["logits"].softmax(dim=1)
    seconds = time.perf_counter() - start
    return Rep(units / seconds / cores, seconds, {"units": units})
