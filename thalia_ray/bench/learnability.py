"""How the test AUROC grows with training steps on synthetic data: the evidence that it is learnable,
and the number to watch when the generator changes.

The samples come through the service's own data path (the index, the balanced training draw of each
epoch, the crops, normalisation and augmentations: `CubeSource` and `finalize`), so the curve describes
what `thalia-ray train` sees; the model comes from the registry and is trained by a plain PyTorch loop
in this process, without Ray, so the curve measures the data, not the distributed machinery. At each
checkpoint the model scores the whole validation and test splits: AUROC of the Deformation class.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from thalia_ray.config import ThaliaConfig


@dataclass(frozen=True)
class Point:
    """The model's separation of the held-out splits after `steps` optimiser steps."""

    steps: int
    val_auroc: float
    test_auroc: float
    seconds: float  # training time so far (evaluation excluded)


def split_arrays(cfg: ThaliaConfig, split: str, epoch: int = 0) -> dict[str, np.ndarray]:
    """One epoch of a split as the pipeline's read tasks make it: images (N, T·C, H, W) and labels."""
    from thalia_ray.data.cube import crop_rng
    from thalia_ray.data.index import SampleIndex, sample_rng
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.sources import CubeSource
    from thalia_ray.data.transforms import finalize, load_statistics
    from thalia_ray.storage import S3Options

    where = DataLocations.of(cfg.data, S3Options.of(cfg.storage))
    source = CubeSource(cfg.data, where.root, cfg.seed, SampleIndex.from_config(cfg.data, cfg.seed, where.root))
    stats = load_statistics(where.statistics) if cfg.data.normalize else None
    training = split == "train"
    items = source.epoch_items(split, epoch)
    crops = lambda key: crop_rng(cfg.data.crop_policy, cfg.seed, key, epoch if training else None)  # noqa: E731
    records = [finalize(source.decode(row, split), cfg.data, stats, sample_rng(cfg.seed, epoch, str(row["key"])),
                        training) for row in source.for_items(items).read(items, crops)]
    return {"image": np.stack([r["image"] for r in records]), "label": np.array([r["label"] for r in records])}


def auroc(model: torch.nn.Module, data: dict[str, np.ndarray], batch: int = 64) -> float:
    """AUROC of the Deformation class over a whole split (torchmetrics; NaN without both classes)."""
    from torchmetrics.functional.classification import binary_auroc

    labels = torch.from_numpy(data["label"])
    if labels.min() == labels.max():
        return float("nan")
    model.eval()
    with torch.no_grad():
        scores = torch.cat([torch.softmax(model(torch.from_numpy(data["image"][i:i + batch]))["logits"], 1)[:, 1]
                            for i in range(0, len(labels), batch)])
    model.train()
    return float(binary_auroc(scores, labels))


def curve(cfg: ThaliaConfig, checkpoints: Sequence[int]) -> tuple[list[Point], dict[str, int]]:
    """Train `cfg`'s model (seed, lr, batch size, weight decay of `cfg.train`) with AdamW and plain
    cross-entropy on fresh balanced epochs, scoring val and test at every checkpoint (steps, ascending)."""
    from thalia_ray.train.evaluate import model_from_config

    torch.manual_seed(cfg.seed)
    held_out = {split: split_arrays(cfg, split) for split in ("val", "test")}
    model = model_from_config(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batch, steps, epoch, trained_s = cfg.train.batch_size, 0, 0, 0.0
    points = [Point(0, auroc(model, held_out["val"]), auroc(model, held_out["test"]), 0.0)] if 0 in checkpoints else []
    counts = {f"{split}_{kind}": int((data["label"] == (kind == "positives")).sum())
              for split, data in held_out.items() for kind in ("positives", "negatives")}
    generator = torch.Generator().manual_seed(cfg.seed)
    while steps < max(checkpoints):
        started = time.perf_counter()
        train = split_arrays(cfg, "train", epoch)
        counts["train_per_epoch"] = len(train["label"])
        order = torch.randperm(len(train["label"]), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):  # the pipeline drops a last partial batch too
            chosen = order[start:start + batch].numpy()
            logits = model(torch.from_numpy(train["image"][chosen]))["logits"]
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(train["label"][chosen]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps in checkpoints:
                trained_s += time.perf_counter() - started
                points.append(Point(steps, auroc(model, held_out["val"]), auroc(model, held_out["test"]), trained_s))
                started = time.perf_counter()
            if steps == max(checkpoints):
                break
        trained_s += time.perf_counter() - started
        epoch += 1
    return points, counts


def run_config(root: str, p: dict[str, Any], seed: int) -> ThaliaConfig:
    """The configuration a learnability run trains: the demo's data settings on `root`."""
    from thalia_ray.config import load_config

    return load_config(None, [f"data.root={root}", f"data.crop={p['crop']}", f"model.name={p['model']}",
                              f"train.lr={p['lr']}", f"train.batch_size={p['batch_size']}", f"seed={seed}"])
