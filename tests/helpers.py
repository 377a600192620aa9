"""Helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def stored_run(store_dir: Path, data_root: Path, task: str = "segmentation", seed: int = 0,
               **data: Any) -> tuple[Any, str]:
    """A finished run record as `fit` leaves it (config, status, results naming a best checkpoint
    with the model's weights), written directly: inference and export need no training, and a
    Ray Train run costs minutes on a loaded 2-core machine. The weights are the seeded initial ones."""
    from thalia_ray.config import ThaliaConfig
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.checkpoint import save_state
    from thalia_ray.train.evaluate import model_from_config

    cfg = ThaliaConfig.model_validate({
        "name": f"infer-{task}", "seed": seed,
        "data": {"root": str(data_root), "crop": 32, **data},
        "model": {"task": task, "name": "unet" if task == "segmentation" else "resnet18"},
        "train": {"batch_size": 8, "num_workers": 1, "cpus_per_worker": 0.5},
        "storage": {"store": str(store_dir)}, "runtime": {"wandb": {"mode": "disabled"}},
    })
    store = ExperimentStore(str(store_dir))
    run_id = store.new_run_id(cfg.name)
    record = store.run(run_id)
    record.write_config(cfg)
    record.set_status("finished", task=task, model=cfg.model.name)
    torch.manual_seed(seed)
    model = model_from_config(cfg)
    with torch.no_grad():  # break BatchNorm's identity statistics so eval mode is not trivially linear
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    checkpoint = store_dir / "ray" / run_id / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    save_state({"model": model.state_dict(), "progress": {"epoch": 1}}, checkpoint)
    record.write_results({"val/f1_deformation": 0.5, "test/f1_deformation": 0.25}, best_epoch=1,
                         best_checkpoint=str(checkpoint))
    return store, run_id
