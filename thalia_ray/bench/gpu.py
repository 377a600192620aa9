"""GPU step throughput against the GPU's own ceiling, and whether the data pipeline keeps up.

For ResNet-50 classification and UNet segmentation at 512² with T = 3, the ceiling is the same
training step on batches already resident on the GPU (nothing to wait for but the GPU); the fed
rate is that step with batches streamed from the project's Ray Data pipeline (windowed cube reads,
transforms, host → device copies). The pipeline keeps up when the fed rate is within 10 % of the
ceiling. Without a CUDA device there is nothing to measure: the suite says so and stops.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch

from thalia_ray.bench.harness import Rep, SuiteUnavailable
from thalia_ray.bench.train_step import BareStep, StepSetup, make_batches, timed_steps
from thalia_ray.config import ThaliaConfig

MODELS = (("resnet50", "classification"), ("unet", "segmentation"))
KEEPS_UP = 0.9  # fed rate / ceiling at or above which the pipeline is said to keep up


def require_gpu() -> str:
    """The CUDA device name, or SuiteUnavailable explaining that this suite needs one."""
    if not torch.cuda.is_available():
        raise SuiteUnavailable(
            "the gpu suite needs a CUDA GPU and torch.cuda.is_available() is False on this machine: "
            "no numbers were measured. Run `thalia-ray bench gpu` on a machine with an NVIDIA GPU."
        )
    return torch.cuda.get_device_name(0)


def gpu_setup(model: str, task: str, crop: int, length: int, batch_size: int, steps: int, warmup: int) -> StepSetup:
    return StepSetup(model=model, task=task, crop=crop, length=length, batch_size=batch_size, steps=steps,
                     warmup=warmup, threads=torch.get_num_threads(), device="cuda")


def ceiling_rep(setup: StepSetup) -> Rep:
    """Steps on batches already on the GPU; value = samples/s, extras: step time in ms."""
    device = torch.device("cuda")
    step = BareStep(setup.config(), device)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in make_batches(setup.config(), setup.steps)]
    started = time.perf_counter()
    rate, seconds = timed_steps(step, batches, setup.warmup, device)
    return Rep(rate * setup.batch_size, time.perf_counter() - started, {"step_ms": 1000 / rate, "timed_s": seconds})


def _pipeline_batches(cfg: ThaliaConfig, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of the train split from the Ray Data pipeline, as torch batches on the host."""
    from thalia_ray.data.pipeline import TorchCollate, build_datasets, set_epoch

    data = build_datasets(cfg, splits=("train",))
    set_epoch(data.epoch_control, epoch)
    yield from data.datasets["train"].iter_torch_batches(
        batch_size=cfg.train.batch_size, collate_fn=TorchCollate(), prefetch_batches=cfg.data.prefetch_batches)


def fed_rep(setup: StepSetup, data_root: str, epoch: int) -> Rep:
    """Steps on batches streamed from the pipeline (same model and step); value = samples/s."""
    device = torch.device("cuda")
    cfg = setup.config().with_overrides({"data.root": data_root})
    step = BareStep(cfg, device)
    started = time.perf_counter()
    done, timed_from = 0, None
    for batch in _pipeline_batches(cfg, epoch):
        if done == setup.warmup:
            torch.cuda.synchronize()
            timed_from = time.perf_counter()
        step({k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        done += 1
        if done == setup.steps:
            break
    if timed_from is None or done <= setup.warmup:
        raise RuntimeError(f"the pipeline gave {done} batches, need more than warmup={setup.warmup}: "
                           f"synthesize more frames or lower the warm-up")
    seconds = time.perf_counter() - timed_from
    rate = (done - setup.warmup) / seconds
    return Rep(rate * setup.batch_size, time.perf_counter() - started, {"step_ms": 1000 / rate, "timed_s": seconds})
