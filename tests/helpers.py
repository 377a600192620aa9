"""Helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def stored_run(store_dir: Path, data_root: Path, task: str = "segmentation", seed: int = 0,
               **data: Any) -> tuple[Any, str]:
    """A finished run (unet or resnet18, 32-px crop) whose best checkpoint holds the seeded initial
    weights: inference and export read it exactly like a trained one, without minutes of Ray Train."""
    from thalia_ray.bench.predict import untrained_run
    from thalia_ray.config import ThaliaConfig

    cfg = ThaliaConfig.model_validate({
        "name": f"infer-{task}", "seed": seed,
        "data": {"root": str(data_root), "crop": 32, **data},
        "model": {"task": task, "name": "unet" if task == "segmentation" else "resnet18"},
        "train": {"batch_size": 8, "num_workers": 1, "cpus_per_worker": 0.5},
        "storage": {"store": str(store_dir)}, "runtime": {"wandb": {"mode": "disabled"}},
    })
    return untrained_run(str(store_dir), cfg, seed)
