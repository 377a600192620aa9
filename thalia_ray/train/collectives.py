"""Collectives over the ranks of a run, each an identity without a process group (one worker, tests).

Every rank must enter each of them the same number of times: the loop and the objectives' validation
call them at the same points on every rank.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist


def all_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each value (identity without a process group)."""
    if not dist.is_initialized():
        return dict(values)
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / dist.get_world_size()).tolist()))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def rank_zero_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank, so that all ranks leave the loop together."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
