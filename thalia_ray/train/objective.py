"""What a run learns: the one part of a run that differs between supervised training and pretraining.

The driver (`trainer.fit`) and the per-worker loop (`loop.WorkerLoop`) are the same for every run:
datasets streamed by the pipeline, DDP, the optimiser and schedule, checkpoints, restarts, the
store's history and the trackers. An `Objective` supplies the rest:

- on the driver: the checks to run before any worker starts (`prepare`), the datasets (`datasets`),
  and what to keep once training is over (`conclude`: the supervised test evaluation, pretraining's
  reconstructions);
- on each worker: the model (`build_model`), the loss of a batch (`loss`), what to do after each
  optimiser step (`after_step`: BYOL's target network), the validation over all ranks (`validate`),
  and what a checkpoint holds beyond the training state (`checkpoint_extras`: pretraining stores the
  encoder's weights, keyed as a classifier's backbone, for fine-tuning).

`Supervised` is the benchmark's classification or segmentation; `thalia_ray.pretrain.objective`
holds self-supervised pretraining. An objective is sent to the workers with the loop's settings, so it
carries only plain values; what it builds on a worker lives in the worker's loop.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import Tensor, nn

from thalia_ray.config import ThaliaConfig
from thalia_ray.data.pipeline import Datasets, build_datasets
from thalia_ray.ids import run_reference
from thalia_ray.losses import build_loss
from thalia_ray.metrics import MetricSuite
from thalia_ray.models.pretrained import IMAGENET
from thalia_ray.train.collectives import all_sum
from thalia_ray.train.evaluate import autocast, evaluate_batches, evaluate_checkpoint, model_from_config

SPLIT_DATASETS = ("train", "val")  # test runs after training, unsplit (see train.evaluate)


@dataclass
class Conclusion:
    """What a finished run keeps beside its history: final metrics (`test/...`), per-sample predictions by
    split, samples skipped after training, and files for the run's folder (name → bytes)."""

    metrics: dict[str, float] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)


class Objective(ABC):
    kind: ClassVar[str]  # the run's kind in the store

    # ------------------------------------------------------------------------------ driver
    @abstractmethod
    def describe(self, cfg: ThaliaConfig) -> dict[str, Any]:
        """The run's `task` and `model`, as its record lists them."""

    def prepare(self, cfg: ThaliaConfig) -> "Objective":
        """Checks before any worker starts; returns the objective the workers get (with what it learnt)."""
        return self

    @abstractmethod
    def datasets(self, cfg: ThaliaConfig, run_id: str, trainer_cpus: float) -> Datasets:
        """The `train` and `val` datasets of the run (and the train split's further lanes)."""

    @abstractmethod
    def conclude(self, cfg: ThaliaConfig, checkpoint: Any, use_gpu: bool) -> Conclusion:
        """What to keep of the best checkpoint once training is over."""

    # ------------------------------------------------------------------------------ workers
    @abstractmethod
    def build_model(self, cfg: ThaliaConfig, initial_weights: bool) -> nn.Module:
        """The model; `initial_weights=False` when a checkpoint is loaded next."""

    def setup(self, cfg: ThaliaConfig, device: torch.device) -> None:
        """Build what the worker's loss and validation need (once per worker)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device,
             precision: str) -> tuple[Tensor, dict[str, float]]:
        """(the loss to minimise, its components by name with `total` among them) of one batch."""

    def after_step(self, model: nn.Module, progress: float) -> None:
        """After each optimiser step; `progress` is the share of the run's steps done."""

    @abstractmethod
    def validate(self, model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
                 precision: str, max_steps: int | None) -> tuple[dict[str, float], int]:
        """(`val/...` metrics over all ranks, samples validated over all ranks); every rank calls it once."""

    def checkpoint_extras(self, model: nn.Module) -> dict[str, Any]:
        """Entries a checkpoint holds beside the training state."""
        return {}


class Supervised(Objective):
    """Deformation classification or segmentation on the benchmark's labelled samples."""

    kind = "train"

    def __init__(self) -> None:
        self.loss_fn: Any = None
        self.suite: MetricSuite | None = None

    def describe(self, cfg: ThaliaConfig) -> dict[str, Any]:
        return {"task": cfg.model.task, "model": cfg.model.name}

    def prepare(self, cfg: ThaliaConfig) -> "Supervised":
        if cfg.model.pretrained == IMAGENET or run_reference(cfg.model.pretrained):
            model_from_config(cfg)  # missing weights fail here, before any worker starts (and the hub cache fills once)
        return self

    def datasets(self, cfg: ThaliaConfig, run_id: str, trainer_cpus: float) -> Datasets:
        return build_datasets(cfg, splits=SPLIT_DATASETS, run_id=run_id, trainer_cpus=trainer_cpus)

    def conclude(self, cfg: ThaliaConfig, checkpoint: Any, use_gpu: bool) -> Conclusion:
        if not cfg.train.test_best:
            return Conclusion()
        test = evaluate_checkpoint(cfg, checkpoint, "test", use_gpu)
        return Conclusion(test.flat("test"), {"test": test.predictions}, test.skipped)

    def build_model(self, cfg: ThaliaConfig, initial_weights: bool) -> nn.Module:
        return model_from_config(cfg, initial_weights=initial_weights)

    def setup(self, cfg: ThaliaConfig, device: torch.device) -> None:
        self.loss_fn = build_loss(cfg.train.loss, cfg.model.task, cfg.model.aux_heads)
        self.suite = MetricSuite(cfg.model.task).to(device)

    def loss(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device,
             precision: str) -> tuple[Tensor, dict[str, float]]:
        with autocast(device, precision):
            outputs = model(batch["image"])
        return self.loss_fn(outputs, batch)

    def validate(self, model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
                 precision: str, max_steps: int | None) -> tuple[dict[str, float], int]:
        """Metrics over all ranks' shards (Ray's equal split: the same batch count on every rank)."""
        assert self.suite is not None, "setup() first"
        self.suite.reset()
        result = evaluate_batches(model, batches, self.loss_fn, self.suite, device, precision, max_steps=max_steps)
        result.loss_sum, count = all_sum([result.loss_sum, float(result.count)], device)
        result.count = int(count)
        result.metrics = self.suite.compute()
        return result.flat("val"), result.count
