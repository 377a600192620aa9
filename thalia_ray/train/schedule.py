"""Learning-rate schedule: linear warm-up, then cosine decay (or constant), stepped once per optimiser step.

The schedule is defined over the run's real number of optimiser steps (epochs × steps per epoch,
from the pipeline's sizes), so the warm-up fraction and the end of the decay mean the same thing
whatever the dataset size, batch size or number of workers. Each epoch starts at its own position,
epoch × steps per epoch (`anchor`), so an epoch with fewer steps (a `random_mix` epoch) does not shift
the ones after it; `train.schedule_epoch_steps` sets that count by hand, as the reference's ViT
schedule counts 2,725 steps per epoch whatever an epoch holds.

Two warm-ups: the default rises linearly from lr/(warmup+1) so that the very first step already
learns; with `train.warmup_start_lr` it is the reference's (timm's `CosineLRScheduler` with
`warmup_lr_init`): it starts at that rate and the rate is set after each step from that step's
position, so step q runs at start + (lr − start)·(q − 1)/warmup.
"""
from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from thalia_ray.config import ConfigError, TrainConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, start_factor: float | None = None) -> float:
    """Multiplier of the base learning rate for optimiser step `step` (0-based schedule position).

    Warm-up: the default form rises linearly from 1/(warmup+1) to 1; the reference form (`start_factor`,
    the start rate over the base rate) runs step q at start + (1 − start)·max(q − 1, 0)/warmup up to
    step `warmup_steps`. Then cosine decays to 0 at `total_steps` (steps past the end stay at 0), or
    constant stays at 1.
    """
    if start_factor is not None and 0 < warmup_steps and step <= warmup_steps:
        return start_factor + (1.0 - start_factor) * max(step - 1, 0) / warmup_steps
    if start_factor is None and step < warmup_steps:
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


def build_scheduler(optimizer: Optimizer, kind: str, total_steps: int, warmup_fraction: float, *,
                    warmup: int | None = None, start_factor: float | None = None) -> LambdaLR:
    """A per-step scheduler; its state dict holds only counters, so it checkpoints without pickles.
    `warmup` (steps) replaces `warmup_fraction` of `total_steps` when given."""
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least one optimiser step, got total_steps={total_steps}")
    factor = partial(
        lr_factor, total_steps=total_steps, kind=kind, start_factor=start_factor,
        warmup_steps=warmup_steps(total_steps, warmup_fraction) if warmup is None else warmup,
    )
    return LambdaLR(optimizer, factor)


def epoch_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """Schedule positions per epoch: `train.schedule_epoch_steps`, else the run's real steps per epoch."""
    return train.schedule_epoch_steps or steps_per_epoch


def run_scheduler(optimizer: Optimizer, train: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """The scheduler `train` configures for a run of `steps_per_epoch` steps per epoch."""
    per_epoch = epoch_steps(train, steps_per_epoch)
    warmup = None if train.warmup_epochs is None else int(round(train.warmup_epochs * per_epoch))
    start = None if train.warmup_start_lr is None else train.warmup_start_lr / train.lr
    return build_scheduler(optimizer, train.scheduler, train.epochs * per_epoch, train.warmup_fraction,
                           warmup=warmup, start_factor=start)


def anchor(scheduler: LambdaLR, position: int) -> None:
    """Put the schedule at `position` (an epoch's first step) without changing the current rate: the
    rate each step sets is that of the next position, so an epoch that ends early leaves its last one
    (as the reference's scheduler, which sets the rate after each step, does)."""
    scheduler.last_epoch = position
