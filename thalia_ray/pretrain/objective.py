"""Pretraining as an `Objective` of the shared driver and worker loop (train/objective.py).

On the driver it plans the source (every series the cubes hold in the allowed periods), learns the
facts the network needs (frame count, phase normalisation) and checks everything a run would otherwise
find out only on the workers. On the workers it builds `PretrainModel`, whose forward pass returns
the losses, moves BYOL's target network after each step, validates on the held-out groups with fixed
views and masks (so that epochs compare), and stores the encoder's weights in every checkpoint
(`encoder`, keyed as a classifier's backbone: what `model.pretrained: run:<RUN_ID>` loads). Once
training is over, an MAE run keeps reconstructions of held-out samples for its report.
"""
from __future__ import annotations

import io
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.pipeline import Datasets, build_datasets, records_to_batch
from thalia_ray.data.samples import BadSample
from thalia_ray.data.transforms import load_statistics
from thalia_ray.pretrain.augment import circular
from thalia_ray.pretrain.model import PHASE, DataFacts, PretrainModel, resolved_method
from thalia_ray.pretrain.source import HOLDOUT, TRAIN, PretrainSource
from thalia_ray.storage import S3Options
from thalia_ray.store.records import RECONSTRUCTIONS
from thalia_ray.train.checkpoint import load_state
from thalia_ray.train.collectives import all_sum
from thalia_ray.train.evaluate import autocast, to_device
from thalia_ray.train.objective import Conclusion, Objective

SHOWN = 6  # held-out samples reconstructed for the report


class Pretraining(Objective):
    kind = "pretrain"

    def __init__(self, source: PretrainSource | None = None, facts: DataFacts | None = None) -> None:
        self.source, self.facts = source, facts

    # ------------------------------------------------------------------------------ driver
    def describe(self, cfg: ThaliaConfig) -> dict[str, Any]:
        return {"task": f"pretrain:{resolved_method(cfg)}", "model": cfg.model.name}

    def prepare(self, cfg: ThaliaConfig) -> "Pretraining":
        """Plan the source and learn the data facts (once), then build the network once, which checks
        the backbone, the method and the crop."""
        if self.source is not None and self.facts is not None:
            return self
        source = PretrainSource.open(cfg)
        if cfg.pretrain.heads.get("location") and not source.positions:
            raise ConfigError(f"pretrain.heads.location: none of the frames {list(source.frames)} has a position: "
                              f"their volcanoes ({schema.FRAME_NAMES_FILE} of data.root) are not in the shipped volcano "
                              "table (thalia_ray/pretrain/volcanoes.csv); drop the location head")
        prepared = Pretraining(source, DataFacts(len(source.frames), *phase_statistics(cfg)))
        PretrainModel(cfg, prepared.facts)
        return prepared

    def datasets(self, cfg: ThaliaConfig, run_id: str, trainer_cpus: float) -> Datasets:
        return build_datasets(cfg, splits=(TRAIN, HOLDOUT), run_id=run_id, trainer_cpus=trainer_cpus,
                              source=self.prepare(cfg).source)

    def conclude(self, cfg: ThaliaConfig, checkpoint: Any, use_gpu: bool) -> Conclusion:
        """An MAE run's reconstructions of the first held-out samples (`RECONSTRUCTIONS`)."""
        prepared = self.prepare(cfg)
        if resolved_method(cfg) != "mae":
            return Conclusion()
        model = prepared.build_model(cfg, initial_weights=False)
        model.load_state_dict(load_state(checkpoint)["model"])
        return Conclusion(files={RECONSTRUCTIONS: reconstructions(model, prepared.source, cfg)})

    # ------------------------------------------------------------------------------ workers
    def build_model(self, cfg: ThaliaConfig, initial_weights: bool) -> nn.Module:
        assert self.facts is not None, "prepare() first"
        return PretrainModel(cfg, self.facts)

    def loss(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device,
             precision: str) -> tuple[Tensor, dict[str, float]]:
        with autocast(device, precision):
            losses = model(batch)
        return losses["total"], {name: float(value.detach()) for name, value in losses.items()}

    def after_step(self, model: nn.Module, progress: float) -> None:
        model.after_step(progress)

    @torch.no_grad()
    def validate(self, model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
                 precision: str, max_steps: int | None) -> tuple[dict[str, float], int]:
        """Mean losses over the held-out series of all ranks, with the same views and masks every epoch."""
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            for step, raw in enumerate(batches):
                if max_steps is not None and step >= max_steps:
                    break
                batch = to_device(raw, device)
                size = len(batch["image"])
                with autocast(device, precision):
                    losses = model(batch)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * size
                count += size
        names = sorted(sums)
        totals = all_sum([*(sums[n] for n in names), float(count)], device)
        samples = int(totals[-1])
        means = {name: total / max(samples, 1) for name, total in zip(names, totals)}
        return {"val/loss": means.pop("total", float("nan")), **{f"val/loss_{k}": v for k, v in means.items()}}, samples

    def checkpoint_extras(self, model: nn.Module) -> dict[str, Any]:
        return {"encoder": model.encoder_state()}


def phase_statistics(cfg: ThaliaConfig) -> tuple[float, float]:
    """(mean, std) the phase is normalised with (0, 1 when it is not), to undo it for circular operations."""
    if not cfg.data.normalize or PHASE not in cfg.data.channels:
        return 0.0, 1.0
    stats = load_statistics(DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics)
    return stats[PHASE]["mean"], stats[PHASE]["std"]


def read_batch(source: PretrainSource, cfg: ThaliaConfig, split: str, count: int) -> dict[str, Any]:
    """A batch of the first `count` readable samples of `split`'s epoch 0, read and built as the pipeline's
    read tasks do, in one process (for the reconstructions, and for tests of the methods)."""
    from thalia_ray.data.transforms import statistics_for

    items = source.epoch_items(split, 0)[:count * 2]
    stats = statistics_for(DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics) if cfg.data.normalize else None
    rows = [r for r in source.for_items(items).read(items, lambda key: None) if not isinstance(r, BadSample)]
    records = [source.record(row, split, stats, None, False) for row in rows[:count]]
    if not records:
        raise ConfigError(f"no {split} sample of data.root {cfg.data.root} could be read")
    batch = records_to_batch(records)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if v.dtype.kind not in "OUS" else [str(x) for x in v]
            for k, v in batch.items()}


def reconstructions(model: PretrainModel, source: PretrainSource, cfg: ThaliaConfig) -> bytes:
    """An `.npz` of the MAE's reconstructions of held-out samples, for the report: for the phase of the
    last member (radians) and each dense pretext map, the truth and the reconstruction (visible patches
    as given, masked ones predicted), the mask of hidden patches, and the samples' keys."""
    model.eval()
    batch = read_batch(source, cfg, HOLDOUT, SHOWN)
    image, dense = batch["image"], model.dense_targets(batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        target = torch.cat([circular(image, model.phase), dense], dim=1)
        rebuilt, mask = model.method.reconstruct(image, target)
    arrays: dict[str, np.ndarray] = {"mask": mask.numpy(), "keys": np.asarray(batch["key"], dtype=str)}
    if model.phase.indices:
        at = model.phase.indices[-1] + model.phase.indices.index(model.phase.indices[-1])  # its cos plane in `target`
        for name, planes in (("phase", target), ("phase_reconstructed", rebuilt)):
            arrays[name] = torch.atan2(planes[:, at + 1], planes[:, at]).numpy()
    start = target.shape[1] - dense.shape[1]
    for head in model.dense:
        planes = model.dense_planes(head)
        arrays[head] = target[:, start + planes - 1].numpy()
        arrays[f"{head}_reconstructed"] = rebuilt[:, start + planes - 1].numpy()
        start += planes
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
