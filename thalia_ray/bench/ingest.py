"""Ingest benchmarks: the Ray Data pipeline against the strongest local alternative, a PyTorch
`DataLoader` with as many persistent worker processes as the data may use, doing the identical work.

Both sides run the pipeline's own plan: the same epoch draw, cut into the same read-task chunks, each
chunk's samples read, decoded and finalized by the same functions (`EpochDatasource.chunks`), and
collated by the same `TorchCollate`. The only difference is who schedules the chunks: Ray Data read
tasks feeding `streaming_split` iterators, epoch after epoch as the training loop streams them
(`EpochLanes`: the next epoch starts on the other lane after the current one's first batch), or DataLoader worker
processes (`batch_size=None`, one chunk per item) iterated epoch after epoch. A run of consecutive
epochs is timed from asking for its first batch to its last, so every epoch's start-up counts; the
steady rate leaves out the time to the run's first batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Iterator, Sequence

from thalia_ray.bench.harness import Rep


@dataclasses.dataclass
class EpochPlan:
    """A DataLoader sampler whose items are the current epoch's chunks (set before each epoch)."""

    chunks: list[Any] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class ChunkDataset:
    """Map-style dataset whose index *is* a chunk (`rows` of `EpochDatasource.chunks`): a worker reads,
    decodes and finalizes the chunk's samples and collates them, exactly what a read task does."""

    def __getitem__(self, rows: Any) -> dict[str, Any]:
        from thalia_ray.data.pipeline import TorchCollate, records_to_batch
        from thalia_ray.data.samples import BadSample

        loads = list(rows())
        bad = [item for item in loads if isinstance(item, BadSample)]
        if bad:  # the pipeline would count and skip it; a benchmark's data must be sound
            raise RuntimeError(f"bad sample in the benchmark data: {bad[0]}")
        return TorchCollate()(records_to_batch([load() for _, _, load in loads]))


def detached(source: Any) -> Any:
    """A copy of a split's datasource without its epoch-control actor handle, so that plain (non-Ray)
    processes can unpickle its chunks; the baseline never meets a bad sample to report."""
    import copy

    clone = copy.copy(source)
    clone.spec = dataclasses.replace(source.spec, handle=None)
    return clone


def make_loader(workers: int, plan: EpochPlan) -> Any:
    """Persistent DataLoader workers (spawned: forking a process that runs Ray and fsspec threads is unsafe)."""
    from torch.utils.data import DataLoader

    return DataLoader(ChunkDataset(), batch_size=None, sampler=plan, num_workers=workers, persistent_workers=True,
                      multiprocessing_context="spawn", prefetch_factor=2)


def ray_run(lanes: Any, epochs: Sequence[int]) -> Iterator[dict[str, Any]]:
    """The batches of consecutive `epochs` from the pipeline's lanes (`EpochLanes`), each next epoch
    started after the current one's first batch, as the training loop does."""
    batches = lanes.start(epochs[0])
    for following in [*epochs[1:], None]:
        upcoming = None
        for batch in batches:
            if upcoming is None and following is not None:
                upcoming = lanes.start(following)
            yield batch
        if following is not None:
            batches = upcoming if upcoming is not None else lanes.start(following)


def loader_run(loader: Any, plan: EpochPlan, source: Any, epochs: Sequence[int], batch_size: int) -> Iterator[dict[str, Any]]:
    """The batches of consecutive `epochs` from persistent DataLoader workers, each epoch the pipeline's plan."""
    for epoch in epochs:
        plan.chunks = [rows for _, rows in source.chunks(epoch, batch_size)]
        yield from loader


def timed_run(batches: Iterable[dict[str, Any]]) -> Rep:
    """Drain a run of epochs; value = samples/s including start-up, extras: steady rate, first-batch seconds."""
    start = time.perf_counter()
    first = end = start
    total = first_n = 0
    for batch in batches:
        end = time.perf_counter()
        if total == 0:
            first, first_n = end, len(batch["key"])
        total += len(batch["key"])
    wall = end - start
    steady = (total - first_n) / (end - first) if end > first else float("nan")
    return Rep(total / wall if wall else float("nan"), wall,
               {"items": float(total), "steady": steady, "first_batch_s": first - start})


def plain_run(cfg: Any, sources: dict[str, Any], steps_per_epoch: int, loader_workers: int, threads: int) -> list[float]:
    """What a user would write instead of `thalia-ray train`: one process, the same model, loss, AdamW,
    schedule, batch size and torch threads, persistent DataLoader workers running the pipeline's
    per-sample work on the same epoch plans. Returns each epoch's (train + val samples) / epoch seconds."""
    import torch

    from thalia_ray.losses import build_loss
    from thalia_ray.train.evaluate import model_from_config
    from thalia_ray.train.schedule import build_scheduler

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    train = cfg.train
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = build_scheduler(optimizer, train.scheduler, train.epochs * steps_per_epoch, train.warmup_fraction)
    loss_fn = build_loss(train.loss, cfg.model.task, cfg.model.aux_heads)
    plans = {split: EpochPlan() for split in ("train", "val")}
    loaders = {split: make_loader(loader_workers, plan) for split, plan in plans.items()}
    plans["val"].chunks = [rows for _, rows in sources["val"].chunks(0)]
    rates = []
    try:
        for epoch in range(train.epochs):
            plans["train"].chunks = [rows for _, rows in sources["train"].chunks(epoch)]
            start, samples = time.perf_counter(), 0
            model.train()
            for step, batch in enumerate(loaders["train"]):
                if step == steps_per_epoch:
                    break
                loss, _ = loss_fn(model(batch["image"]), batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                samples += len(batch["key"])
            model.eval()
            with torch.no_grad():
                for batch in loaders["val"]:
                    loss_fn(model(batch["image"]), batch)
                    samples += len(batch["key"])
            rates.append(samples / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(saved_threads)
    return rates
