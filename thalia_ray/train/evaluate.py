"""Evaluation: one pass of a model over batches, per-sample predictions, and checkpoint re-evaluation.

The same `evaluate_batches` serves the training loop's validation and the final test of the best
checkpoint, so validation and test numbers are computed identically. Testing runs in one Ray task
over the whole, unsplit test split: Ray Train's equal split would drop up to `num_workers - 1`
samples, and a rank that receives no sample cannot take part in torchmetrics' gather of
list-valued states (AP, AUROC) — it aborts the gloo process group. `evaluate_run` re-evaluates a
finished run from what the experiment store recorded and gives the same numbers.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterable, Mapping

import ray
import torch
from ray.train import Checkpoint
from torch import Tensor, nn

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data.cube import DataError
from thalia_ray.ids import run_reference
from thalia_ray.losses import LossFn, build_loss
from thalia_ray.metrics import MetricSuite
from thalia_ray.models.factory import build_model, load_weights
from thalia_ray.models.pretrained import PretrainedWeightsError
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import StoreError, format_metrics, shortfalls
from thalia_ray.train.checkpoint import load_state

log = logging.getLogger(__name__)

@dataclass
class Evaluation:
    """Summed loss over `count` samples (so ranks can be added up), metrics, optional predictions, the
    samples a whole-split evaluation skipped as unreadable (see `pipeline.skipped_samples`) and how many
    samples the split has (`expected`), so that metrics over fewer say so."""

    loss_sum: float = 0.0
    count: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    expected: int | None = None

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else float("nan")

    def flat(self, prefix: str) -> dict[str, float]:
        """`{prefix}/loss`, `{prefix}/{metric}` and `{prefix}/n_evaluated` (and `n_expected` when known)
        keys, as reported to Ray and stored."""
        counts = {f"{prefix}/n_evaluated": self.count}
        if self.expected is not None:
            counts[f"{prefix}/n_expected"] = self.expected
        return {f"{prefix}/loss": self.loss, **{f"{prefix}/{k}": v for k, v in self.metrics.items()}, **counts}


def model_from_config(cfg: ThaliaConfig, initial_weights: bool = True) -> nn.Module:
    """The configured model for inputs of T·C stacked channels, with `model.pretrained`'s weights.

    `initial_weights=False` skips them (a checkpoint is loaded next). `run:<RUN_ID>` starts from that
    run's best checkpoint in the configured store (a pretraining run's: its encoder); tensors that do
    not fit (another head, other channels) are adapted or skipped as for a weights file.
    """
    time_steps = cfg.data.length
    run_id = run_reference(cfg.model.pretrained)
    keep = initial_weights and run_id is None
    model_cfg = cfg.model if keep else cfg.model.model_copy(update={"pretrained": None})
    model = build_model(model_cfg, time_steps * len(cfg.data.channels), time_steps)
    if initial_weights and run_id is not None:
        store = ExperimentStore.of(cfg.storage)
        try:
            saved = load_state(best_checkpoint(store, run_id))
            state = saved.get("encoder", saved["model"])  # a pretraining run's encoder, keyed as a backbone
        except StoreError as err:
            raise PretrainedWeightsError(f"model.pretrained {cfg.model.pretrained!r}: {err}") from None
        report = load_weights(model, state, f"model.pretrained {cfg.model.pretrained!r}")
        log.info("model.pretrained %s: %s", cfg.model.pretrained, report.summary())
    return model


def best_checkpoint(store: ExperimentStore, run_id: str) -> Checkpoint:
    """A finished run's best checkpoint, as its results recorded it."""
    results = store.existing_run(run_id).read_results()
    if not results or not results.get("best_checkpoint"):
        raise StoreError(f"run {run_id} has no best checkpoint in its results (has it finished?)")
    filesystem, _ = store.ray_storage()
    return Checkpoint(results["best_checkpoint"], filesystem=filesystem)


def autocast(device: torch.device, precision: str) -> ContextManager:
    """bf16/fp16 autocast on CUDA; full precision elsewhere."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved to `device`; string columns (lists) left as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def deformation_scores(logits: Tensor, task: str) -> tuple[Tensor, Tensor]:
    """Per-sample Deformation score and 0/1 prediction.

    Classification: the class probability and the argmax. Segmentation: the largest pixel
    probability and whether any pixel is predicted as Deformation.
    """
    probs = logits.detach().float().softmax(dim=1)[:, 1]
    if task == "classification":
        return probs, logits.argmax(dim=1)
    return probs.flatten(1).amax(dim=1), (logits.argmax(dim=1) == 1).flatten(1).any(dim=1).long()


def sample_predictions(outputs: Mapping[str, Tensor], batch: Mapping[str, Any], task: str) -> list[dict[str, Any]]:
    """One row per sample: key, frame_id, intensity, activity_type, label, score, pred."""
    scores, preds = deformation_scores(outputs["logits"], task)
    labels = batch["label"].tolist()
    return [
        {
            "key": batch["key"][i],
            "frame_id": batch["frame_id"][i],
            "intensity": batch["intensity"][i],
            "activity_type": batch["activity_type"][i],
            "label": int(labels[i]),
            "score": float(scores[i]),
            "pred": int(preds[i]),
        }
        for i in range(len(labels))
    ]


@torch.no_grad()
def evaluate_batches(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    loss_fn: LossFn,
    suite: MetricSuite,
    device: torch.device,
    precision: str = "fp32",
    *,
    max_steps: int | None = None,
    collect: bool = False,
) -> Evaluation:
    """Loss, metric state and (when `collect`) predictions over `batches`.

    `suite.compute()` is left to the caller: under torch.distributed it is a collective, which
    every rank must enter after its own pass. Pass the bare model, not its DDP wrapper: DDP's
    forward may broadcast buffers, a collective that would hang ranks with uneven shards.
    """
    model.eval()
    result = Evaluation()
    for step, raw in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        batch = to_device(raw, device)
        with autocast(device, precision):
            outputs = model(batch["image"])
        loss, _ = loss_fn(outputs, batch)
        size = len(batch["label"])
        result.loss_sum += float(loss) * size
        result.count += size
        suite.update(outputs, batch)
        if collect:
            result.predictions.extend(sample_predictions(outputs, batch, suite.task))
    return result


def load_model(cfg: ThaliaConfig, checkpoint: Checkpoint) -> nn.Module:
    """The configured model with the checkpoint's weights (a task model's: a pretraining run's checkpoint
    holds an encoder without a task head, and is refused with the way to use it)."""
    state = load_state(checkpoint)
    if "encoder" in state:
        raise PretrainedWeightsError(f"{checkpoint.path} is a pretraining run's checkpoint: an encoder without a "
                                     "task head. Fine-tune from it (model.pretrained: run:<RUN_ID>) and use that run")
    model = model_from_config(cfg, initial_weights=False)
    model.load_state_dict(state["model"])
    return model


def gpu_wanted(cfg: ThaliaConfig) -> bool:
    """`train.device`: auto uses GPUs when the connected cluster has any; gpu insists on them."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.device == "gpu" and not gpus:
        raise ConfigError("train.device is 'gpu' but the Ray cluster has no GPU")
    return cfg.train.device == "gpu" or (cfg.train.device == "auto" and gpus > 0)


def evaluate_checkpoint(cfg: ThaliaConfig, checkpoint: Checkpoint, split: str = "test", use_gpu: bool = False) -> Evaluation:
    """Evaluate a checkpoint on a whole split in one Ray task (with a GPU when `use_gpu`)."""
    # "DEFAULT" scheduling: inside a Tune trial the task must not be captured by the trial driver's
    # token placement group (0.01 CPU), which could never hold it.
    task = ray.remote(_evaluate_task).options(
        num_cpus=cfg.train.cpus_per_worker, num_gpus=cfg.train.gpus_per_worker if use_gpu else 0,
        scheduling_strategy="DEFAULT",
    )
    return ray.get(task.remote(cfg.model_dump(mode="json"), checkpoint, split))


def _evaluate_task(raw_cfg: dict[str, Any], checkpoint: Checkpoint, split: str) -> Evaluation:
    from thalia_ray.data.pipeline import TorchCollate, bad_sample_report, build_datasets, skipped_samples

    cfg = ThaliaConfig.model_validate(raw_cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(cfg, checkpoint).to(device)
    data = build_datasets(cfg, splits=(split,))
    batches = data.datasets[split].iter_torch_batches(
        batch_size=cfg.train.batch_size, collate_fn=TorchCollate(), prefetch_batches=cfg.data.prefetch_batches
    )
    suite = MetricSuite(cfg.model.task).to(device)
    loss_fn = build_loss(cfg.train.loss, cfg.model.task, cfg.model.aux_heads)
    result = evaluate_batches(model, batches, loss_fn, suite, device, cfg.train.precision, collect=True)
    result.skipped = skipped_samples(bad_sample_report(data.epoch_control))  # before the ledger's actor goes
    result.expected = data.sizes[split]
    if not result.count:
        raise DataError(f"split {split!r} of {cfg.data.root!r} has no samples to evaluate")
    result.metrics = suite.compute()
    return result


@dataclass(frozen=True)
class RunEvaluation:
    """What `thalia-ray evaluate` reports: a stored run's metrics on one split, and how many samples
    it skipped as unreadable (listed in the run's skipped.json, marked `command: evaluate`)."""

    run_id: str
    split: str
    metrics: dict[str, float]
    skipped: int
    store: str  # the experiment store's URL

    def __str__(self) -> str:
        """The metrics, one per line, then one summary line with the skipped count (and, when the metrics
        miss samples, over how many of the split's samples they are)."""
        short = "".join(f", {s.split(' ', 1)[1]}" for s in shortfalls(self.metrics, (self.split,)))
        return "\n".join([*format_metrics(self.metrics), f"run {self.run_id} evaluated on {self.split}: "
                          f"{self.skipped} samples skipped{short} (store {self.store})"])


def evaluate_run(store: ExperimentStore, run_id: str, split: str = "test") -> RunEvaluation:
    """Re-evaluate a finished run's best checkpoint on `split`, from its stored config and results.

    The samples it skips replace this command's earlier rows for `split` in the run's skipped.json;
    training's rows stay. They carry no epoch: no training epoch read them.
    """
    record = store.existing_run(run_id)
    cfg = record.read_config()
    result = evaluate_checkpoint(cfg, best_checkpoint(store, run_id), split, gpu_wanted(cfg))
    skipped = record.write_skipped([{**row, "epoch": None} for row in result.skipped], "evaluate", (split,))
    return RunEvaluation(run_id, split, result.flat(split), skipped, store.root.url)
