"""One optimisation step, as the worker loop and the paper-preset tests run it.

`train.grad_reset` says when gradients are cleared. `step` clears them before every backward pass
(the usual loop). `epoch` clears them once at the start of an epoch, so each step applies the sum of
every gradient since the epoch began: the reference's `train_epoch` does this (it sets `grad = None`
once, before its batch loop), and the paper presets use it to reproduce its results.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from thalia_ray.config import TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the configured learning rate and weight decay (the reference's optimiser)."""
    return torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)


def clear_gradients(optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                   train: TrainConfig) -> None:
    """Backward pass and optimiser step; gradients cleared first unless `train.grad_reset` is `epoch`."""
    if train.grad_reset == "step":
        clear_gradients(optimizer)
    scaler.scale(loss).backward()
    if train.grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    scaler.step(optimizer)
    scaler.update()
