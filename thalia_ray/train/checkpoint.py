"""Training checkpoints: one `state.pt` file of tensors, numbers, strings, lists and dicts.

The file is written with plain `torch.save` and read back with `weights_only=True`, so loading a
checkpoint never executes code. Model weights are stored without the DistributedDataParallel
`module.` prefix, so they load into a bare model for evaluation as well as into a DDP one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from ray.train import Checkpoint
from torch import nn

STATE_FILE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_state(state: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


def load_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The state dict of a Ray checkpoint (local or remote), loaded on CPU without unpickling code."""
    with checkpoint.as_directory() as directory:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint.path!r} has no {STATE_FILE}")
        return torch.load(path, map_location="cpu", weights_only=True)


def to_checkpoint(state: dict[str, Any]) -> tuple[Checkpoint, tempfile.TemporaryDirectory]:
    """Write `state` to a fresh temporary directory; keep the returned handle until Ray has copied it."""
    tmp = tempfile.TemporaryDirectory(prefix="thalia-ckpt-")
    save_state(state, tmp.name)
    return Checkpoint.from_directory(tmp.name), tmp
