"""Training checkpoints: one `state.pt` file of tensors, numbers, strings, lists and dicts.

The file is written with plain `torch.save` and read back with `weights_only=True`, so loading a
checkpoint never executes code. Model weights are stored without the DistributedDataParallel
`module.` prefix, so they load into a bare model for evaluation as well as into a DDP one.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from ray.train import Checkpoint
from torch import nn

from thalia_ray.errors import excerpt
from thalia_ray.store.records import StoreError

STATE_FILE = "state.pt"
# How torch names what a weights-only load refused ("Unsupported global: GLOBAL posix.system ...").
_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_state(state: dict[str, Any], directory: str | Path) -> Path:
    path = Path(directory) / STATE_FILE
    torch.save(state, path)
    return path


class CheckpointError(StoreError):
    """A checkpoint that is missing, damaged or not one of ours; it was not loaded."""


def load_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The state dict of a Ray checkpoint (local or remote), loaded on CPU without unpickling code."""
    with checkpoint.as_directory() as directory:
        return read_state(Path(directory) / STATE_FILE, checkpoint.path)


def check_state(checkpoint: Checkpoint) -> None:
    """Refuse a damaged or hostile checkpoint before any cluster work: on a local store its `state.pt` is
    read memory-mapped (the tensors stay on disk, so this is cheap at any size). A checkpoint in object
    storage would have to be downloaded; the worker that loads it answers in one line instead."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        read_state(Path(checkpoint.path) / STATE_FILE, checkpoint.path, mmap=True)


def read_state(path: Path, where: str, mmap: bool = False) -> dict[str, Any]:
    """A `state.pt` loaded with `weights_only=True`; anything else is a CheckpointError naming the file,
    what is wrong and what to do (torch's own text would advise turning the safety off)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {where}: no {STATE_FILE} (deleted, or not written to the end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every way a file can fail to be a checkpoint ends the same
        raise CheckpointError(f"checkpoint {where}/{STATE_FILE}: {_what_is_wrong(err)}, so it was not loaded. "
                              "Train the run again under a new --run-id, or use another "
                              "run's checkpoint") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {where}/{STATE_FILE}: not a thalia-ray checkpoint (no model state)")
    return state


def _what_is_wrong(err: Exception) -> str:
    """Why torch refused a file, in our words: a pickled object where only tensors may be, or damage."""
    refused = _PICKLED_GLOBAL.search(str(err))
    if refused:
        return (f"it holds a pickled object ({excerpt(refused.group(1), 60)}), which no checkpoint of ours "
                "contains: it may have been tampered with")
    return "it is damaged or not a PyTorch checkpoint (cut short or overwritten)"


def to_checkpoint(state: dict[str, Any]) -> tuple[Checkpoint, tempfile.TemporaryDirectory]:
    """Write `state` to a fresh temporary directory; keep the returned handle until Ray has copied it."""
    tmp = tempfile.TemporaryDirectory(prefix="thalia-ckpt-")
    save_state(state, tmp.name)
    return Checkpoint.from_directory(tmp.name), tmp
