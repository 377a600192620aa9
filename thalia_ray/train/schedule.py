"""Learning-rate schedule: linear warm-up, then cosine decay (or constant), stepped once per optimiser step.

The schedule is defined over the run's real number of optimiser steps (epochs × steps per epoch,
from the pipeline's sizes), so the warm-up fraction and the end of the decay mean the same thing
whatever the dataset size, batch size or number of workers.
"""
from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from thalia_ray.config import ConfigError


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate before optimiser step `step` (0-based).

    Warm-up rises linearly from 1/(warmup+1) to 1 so that the very first step already learns;
    cosine then decays to 0 at `total_steps`; steps past the end stay at 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ConfigError(f"train.scheduler {kind!r} is not one of: cosine, constant")
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    return int(round(total_steps * warmup_fraction))


def build_scheduler(optimizer: Optimizer, kind: str, total_steps: int, warmup_fraction: float) -> LambdaLR:
    """A per-step scheduler; its state dict holds only counters, so it checkpoints without pickles."""
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least one optimiser step, got total_steps={total_steps}")
    factor = partial(
        lr_factor, total_steps=total_steps, warmup_steps=warmup_steps(total_steps, warmup_fraction), kind=kind
    )
    return LambdaLR(optimizer, factor)
