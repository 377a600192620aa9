"""Training-step throughput: the project's Ray Train worker loop against a bare PyTorch loop.

Both sides train the same model (same config, same seed, same initial weights) with the same loss,
AdamW, schedule and gradient clipping, on the same pre-built batches, with the same number of CPU
threads; the data pipeline is deliberately out of the picture (see the `pipeline` suite for it).
The Ray side is the real `WorkerLoop.train_step` inside a one-worker `TorchTrainer` holding every
CPU the bare loop uses. Steady-state steps/s exclude warm-up steps and Ray's start-up (worker
group, process group, model preparation), which is reported separately: it is paid once per run.
"""
from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thalia_ray.bench.harness import Rep
from thalia_ray.config import ThaliaConfig, load_config


@dataclass(frozen=True)
class StepSetup:
    """What one comparison trains on; `threads` CPU threads on both sides (the Ray worker holds as many CPUs)."""

    model: str = "resnet18"
    task: str = "classification"
    crop: int = 64
    length: int = 1
    batch_size: int = 8
    steps: int = 20
    warmup: int = 3
    threads: int = 2
    device: str = "cpu"

    def config(self) -> ThaliaConfig:
        return load_config(None, [
            f"model.task={self.task}", f"model.name={self.model}", f"data.crop={self.crop}",
            f"data.length={self.length}", f"train.batch_size={self.batch_size}", "train.num_workers=1",
            f"train.cpus_per_worker={self.threads}", f"train.device={'gpu' if self.device == 'cuda' else 'cpu'}",
            "runtime.wandb.mode=disabled", "train.epochs=1",
        ])


def make_batches(cfg: ThaliaConfig, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`count` batches shaped like the pipeline's records (image, label, mask, confidence), seeded."""
    gen = torch.Generator().manual_seed(seed)
    b, side = cfg.train.batch_size, cfg.data.crop
    channels = cfg.data.length * len(cfg.data.channels)
    return [{
        "image": torch.randn(b, channels, side, side, generator=gen),
        "label": torch.randint(0, 2, (b,), generator=gen),
        "mask": torch.randint(0, 2, (b, side, side), generator=gen),
        "confidence": torch.rand(b, generator=gen),
    } for _ in range(count)]


class BareStep:
    """What a user would write without Ray: model, AdamW, the same schedule, loss, clipping, one step."""

    def __init__(self, cfg: ThaliaConfig, device: torch.device) -> None:
        from thalia_ray.losses import build_loss
        from thalia_ray.train.evaluate import model_from_config
        from thalia_ray.train.loop import seed_everything
        from thalia_ray.train.schedule import build_scheduler

        seed_everything(cfg.seed)  # the same initial weights as the worker loop
        train = cfg.train
        self.model = model_from_config(cfg).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, train.scheduler, 10_000, train.warmup_fraction)
        self.loss_fn = build_loss(train.loss, cfg.model.task, cfg.model.aux_heads)
        self.clip = train.grad_clip

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        loss, components = self.loss_fn(self.model(batch["image"]), batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()
        return components


def timed_steps(step: Any, batches: list[dict[str, torch.Tensor]], warmup: int, device: torch.device) -> tuple[float, float]:
    """Run `warmup` untimed then the remaining batches timed; returns (steps/s, timed seconds)."""
    for batch in batches[:warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)  # each step reads its loss value back, which synchronises the device
    seconds = time.perf_counter() - start
    return (len(batches) - warmup) / seconds, seconds


def bare_rep(setup: StepSetup, batches: list[dict[str, torch.Tensor]]) -> Rep:
    """One repetition of the bare loop in this process (fresh model, so both sides start alike)."""
    device = torch.device(setup.device)
    previous = torch.get_num_threads()
    torch.set_num_threads(setup.threads)
    try:
        started = time.perf_counter()
        step = BareStep(setup.config(), device)
        on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]
        startup = time.perf_counter() - started
        rate, seconds = timed_steps(step, on_device, setup.warmup, device)
    finally:
        torch.set_num_threads(previous)
    return Rep(rate, time.perf_counter() - started, {"startup_s": startup, "timed_s": seconds})


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: the project's WorkerLoop, fed the pre-built batches; reports timings."""
    import json
    import os

    import ray.train
    from ray.train import Checkpoint

    from thalia_ray.train.evaluate import to_device
    from thalia_ray.train.loop import LoopSettings, WorkerLoop

    torch.set_num_threads(config["threads"])
    first = time.time()
    loop = WorkerLoop(LoopSettings(cfg=config["cfg"], run_id=config["run_id"], steps_per_epoch=10_000,
                                   epoch_control=None))
    batches = [to_device(b, loop.device) for b in config["batches"]]
    rate, seconds = timed_steps(loop.train_step, batches, config["warmup"], loop.device)
    with tempfile.TemporaryDirectory() as tmp:
        timings = {"steps_per_s": rate, "timed_s": seconds, "worker_started": first}
        with open(os.path.join(tmp, "timings.json"), "w") as fh:
            json.dump(timings, fh)
        # Result.metrics is filled only from reports that carry a checkpoint.
        ray.train.report(timings, checkpoint=Checkpoint.from_directory(tmp))


def ray_rep(setup: StepSetup, batches: list[dict[str, torch.Tensor]]) -> Rep:
    """One repetition on Ray Train: a fresh one-worker TorchTrainer (needs a connected Ray)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = setup.config()
    use_gpu = setup.device == "cuda"
    resources = {"CPU": float(setup.threads), **({"GPU": 1.0} if use_gpu else {})}
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "run_id": "bench-train-step",
                               "batches": batches, "warmup": setup.warmup, "threads": setup.threads},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=f"bench-{uuid.uuid4().hex[:8]}", storage_path=storage),
        )
        started_wall, started = time.time(), time.perf_counter()
        metrics = trainer.fit().metrics
        total = time.perf_counter() - started
    return Rep(float(metrics["steps_per_s"]), total,
               {"startup_s": float(metrics["worker_started"]) - started_wall, "timed_s": float(metrics["timed_s"])})
