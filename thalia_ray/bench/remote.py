"""Training from object storage at a distance: `thalia-ray train` on the same cubes from local disk and
from a bucket, and a plain PyTorch script whose DataLoader reads the same bucket.

The bucket is `rclone serve s3` over the dataset's own folder (no upload; `s3server`), behind the
distance proxy (`proxy.ProxyProcess`: per-request latency, a bandwidth cap) on 127.0.0.1. Each side
trains a few epochs; the first epoch (cold: every chunk comes from the bucket) is reported apart from
the later ones (warm: from the node-local cache when `cache` is on), with the requests and bytes per
sample the run's history recorded, and the server's and the proxy's CPU per request (neither should
be what is measured).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from thalia_ray.bench.harness import Rep
from thalia_ray.traffic import Traffic, epoch_samples

BUCKET = "thalia"  # the dataset's bucket
SHARDS_BUCKET = "shards"  # an export's, for runs from shards


@dataclass(frozen=True)
class RunRates:
    """One training run's epochs: samples/s of the first and the median of the later ones, traffic per epoch."""

    first: float
    later: float
    traffic: list[Traffic]
    samples: list[int]
    wall_s: float

    def per_sample(self, field: str, later: bool) -> float:
        pairs = list(zip(self.traffic, self.samples))[1:] if later else list(zip(self.traffic, self.samples))[:1]
        return sum(getattr(t, field) for t, _ in pairs) / max(1, sum(n for _, n in pairs))

    def reps(self) -> dict[str, Rep]:
        return {"first": Rep(self.first, self.wall_s), "later": Rep(self.later, self.wall_s)}


def rates(epoch_rates: list[float], traffic: list[Traffic], samples: list[int], wall_s: float) -> RunRates:
    return RunRates(epoch_rates[0], statistics.median(epoch_rates[1:] or epoch_rates), traffic, samples, wall_s)


def bucket_root(data: str, tmp: str, shards: str = "") -> str:
    """A folder for the server whose buckets are the dataset (`BUCKET`) and an export (`SHARDS_BUCKET`),
    as links (rclone follows them)."""
    served = Path(tmp) / "served"
    served.mkdir()
    (served / BUCKET).symlink_to(Path(data).resolve(), target_is_directory=True)
    if shards:
        (served / SHARDS_BUCKET).symlink_to(Path(shards).resolve(), target_is_directory=True)
    return str(served)


@contextlib.contextmanager
def credentials(env: dict[str, str]) -> Iterator[None]:
    """The server's credentials in this process's environment (so in Ray's workers'), restored after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_overrides(p: dict[str, Any], root: str, store: str, shards: str = "") -> list[str]:
    """The issue's setting: T=3, crop 96, batch 16, mobilenetv3_small, one worker, train + val epochs;
    from the shards under `shards` when given."""
    return [f"data.root={root}", *(["data.source=shards", f"data.shards={shards}"] if shards else []),
            f"data.length={p['length']}", f"data.crop={p['crop']}", "data.atmospheric=[]", f"data.balance={p['balance']}",
            "data.augmentations=false", f"model.name={p['model']}", "model.task=classification",
            f"train.batch_size={p['batch_size']}", f"train.epochs={p['epochs']}", "train.num_workers=1",
            f"train.cpus_per_worker={p['cpus_per_worker']}", "train.max_steps_per_epoch=null",
            "train.test_best=false", "train.early_stopping.patience=null", "runtime.wandb.mode=disabled",
            "runtime.tracking=[]", f"storage.store={store}"]


def remote_overrides(endpoint: str, cache: str | None) -> list[str]:
    return [f"storage.endpoint_url={endpoint}", f"storage.cache.enabled={cache is not None}",
            *([f"storage.cache.path={cache}"] if cache else [])]


def train_run(overrides: list[str], store: str) -> RunRates:
    """`thalia-ray train` (fit) with these settings: its epochs' rates and storage traffic from its history."""
    from thalia_ray.config import load_config
    from thalia_ray.storage import S3Options, resolve
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.trainer import fit

    started = time.perf_counter()
    cfg = load_config(None, overrides)
    history = fit(cfg, store=ExperimentStore(resolve(store, S3Options.of(cfg.storage)))).history
    return rates([float(row["time/samples_per_s"]) for row in history], [Traffic.from_metrics(r) for r in history],
                 [epoch_samples(r) or 0 for r in history], time.perf_counter() - started)


def loader_run(overrides: list[str], workers: int, threads: int) -> RunRates:
    """The plain PyTorch script (`ingest.plain_run`) whose DataLoader workers read the same data."""
    from thalia_ray.bench import ingest
    from thalia_ray.config import load_config
    from thalia_ray.data.pipeline import build_datasets
    from thalia_ray.train.trainer import steps_per_epoch

    cfg = load_config(None, overrides)
    data = build_datasets(cfg, splits=("train", "val"))
    sources = {split: ingest.detached(source) for split, source in data.sources.items()}
    started = time.perf_counter()
    epoch_rates = ingest.plain_run(cfg, sources, steps_per_epoch(cfg, data.sizes), workers, threads)
    return rates(epoch_rates, [], [], time.perf_counter() - started)
