"""Typed configuration: one validated object per run, built from defaults, a YAML file and overrides.

Every section forbids unknown keys, so a typo fails at load time with the field's dotted path, the
offending value and what is allowed, before any cluster work starts. The resolved object is stored
with every run (`to_yaml`) and is enough to reproduce it.
"""
from __future__ import annotations

import copy
import os
import tempfile
from datetime import date
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from thalia_ray import safe_yaml
from thalia_ray.credentials import scan_tree
from thalia_ray.data import schema
from thalia_ray.errors import ConfigError, StoreError, excerpt
from thalia_ray.ids import check_id, run_reference
from thalia_ray.metric_names import F1, LOSS, VAL, key
from thalia_ray.models.registry import REGISTRY, check_encoder, check_model_name
from thalia_ray.traffic import DEFAULT_REQUEST_PRICE


class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- data
class SplitRange(Section):
    start: date
    end: date

    @model_validator(mode="after")
    def _ordered(self) -> "SplitRange":
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self


def _published_splits() -> dict[str, SplitRange]:
    return {k: SplitRange(start=s, end=e) for k, (s, e) in schema.SPLITS.items()}


class AugmentConfig(Section):
    """Training augmentations; each has its own probability (0 disables it)."""

    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)
    rotate: float = Field(0.0, ge=0, le=1)
    rotate_degrees: float = Field(180.0, ge=0, le=180)
    resized_crop: float = Field(0.0, ge=0, le=1)
    resized_crop_scale: tuple[float, float] = (0.7, 1.0)
    blur: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    gaussian_noise: float = Field(0.0, ge=0, le=1)
    gaussian_noise_std: float = Field(0.05, ge=0)
    multiplicative_noise: float = Field(0.0, ge=0, le=1)
    multiplicative_range: tuple[float, float] = (0.9, 1.1)
    cutout: float = Field(0.0, ge=0, le=1)
    cutout_fraction: float = Field(0.2, gt=0, lt=1)
    elastic: float = Field(0.0, ge=0, le=1)
    elastic_alpha: float = Field(8.0, ge=0)
    elastic_sigma: float = Field(4.0, gt=0)


class SynthConfig(Section):
    """How `synth` and `demo` generate the embedded synthetic dataset."""

    frames: int = Field(4, ge=1)
    size: int = Field(128, ge=32)
    seed: int = 0
    from_annotations: str | None = None  # a folder with the real annotations and time-series index
    frame_ids: list[str] | None = None
    max_groups_per_frame: int | None = Field(24, ge=1)  # sampled mode: time-series groups per frame


class DataConfig(Section):
    root: str = "./data/thalia-synthetic"  # dataset root: {frame}.zarr cubes + annotations + index
    # cube: the minicubes under `root`; shards: the WebDataset shards `export` wrote under `shards`;
    # published: the published Thalia shards under `shards`. Each is a class in data/sources.py (SOURCES).
    source: Literal["cube", "shards", "published"] = "cube"
    shards: str | None = None  # the shard root (source: shards or published)
    length: int = Field(1, ge=1, le=32)  # time-series length T
    policy: Literal["enumerate", "resample"] = "enumerate"
    # How a group shorter than T is padded with duplicates (enumerate policy): per_group draws each group's
    # duplicates from its own generator (seed, frame, primary date: stable under any frame subset);
    # reference draws them as the reference does, from one Python `random` seeded with `seed` per split,
    # walking the time-series index in file order (the paper presets).
    padding: Literal["per_group", "reference"] = "per_group"
    splits: dict[Literal["train", "val", "test"], SplitRange] = Field(default_factory=_published_splits)
    geomorphology: list[Literal["insar_difference", "insar_coherence", "dem"]] = list(schema.GEOMORPHOLOGY)
    atmospheric: list[
        Literal["total_column_water_vapour", "surface_pressure", "vertical_integral_of_temperature"]
    ] = []
    crop: int = Field(64, ge=8)
    mask_target: Literal["last", "peak", "union", "all"] = "union"
    # centred: training crops around the annotation polygons' box ±crop/4, fresh each epoch; val/test
    # centred on it. reference: the reference's crops, one random crop per sample fixed by its key
    # (every split and epoch; cubes and exports agree), around the rasterised cube mask.
    crop_policy: Literal["centred", "reference"] = "centred"
    label_rule: Literal["union", "last"] = "union"
    # Label rule of val/test series; null: label_rule. The reference labels val/test by union whatever
    # rule it trains with: set `union` to compare a `last` run with it.
    eval_label_rule: Literal["union", "last"] | None = None
    balance: bool = True  # per-epoch undersampling of training negatives
    # How a balanced training epoch is drawn. equal: every positive plus as many negatives drawn uniformly
    # without replacement. random_mix: the reference's shard path (RandomMix of a shuffled positive and a
    # shuffled negative stream, each sample from either with probability 1/2, until a draw meets the
    # exhausted stream), so an epoch has every positive and a random number of negatives (the paper presets).
    balance_plan: Literal["equal", "random_mix"] = "equal"
    normalize: bool = True
    statistics: str | None = None  # defaults to {root}/statistics.json
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    augmentations: bool = True
    on_bad_sample: Literal["skip", "fail"] = "skip"
    max_bad_samples: int = Field(16, ge=0)
    on_malformed_annotation: Literal["skip", "fail"] = "skip"
    frames: list[str] | None = None  # restrict to these frame ids
    # Share of the labelled training series kept, per class (at least one of each), chosen by `seed`
    # and nested: the 5 % are inside the 20 %. For label-efficiency studies (`thalia-ray bench pretrain`).
    label_fraction: float = Field(1.0, gt=0, le=1)
    # Rows of each model-ready block a read task yields; the trainers cut blocks into batches. Blocks of
    # several batches halve Ray Data's per-block cost (BENCHMARKS.md: 64 vs 16 at crop 128, T=3).
    samples_per_block: int = Field(64, ge=1)
    # Samples one read task reads (yielding a block every samples_per_block); null: each epoch cut into
    # about four tasks per read process, so few task start-ups and an even finish.
    samples_per_read_task: int | None = Field(None, ge=1)
    prefetch_batches: int = Field(2, ge=0)
    synthetic: SynthConfig = Field(default_factory=SynthConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        """`shard_format` was folded into `source`: the old spelling is refused with the new one."""
        if isinstance(values, dict) and "shard_format" in values:
            new = "published" if values["shard_format"] == "published" else "shards"
            raise ValueError(f"data.shard_format is gone: write data.source: {new} (with data.shards) instead of "
                             f"data.source: shards with data.shard_format: {values['shard_format']}")
        return values

    @field_validator("geomorphology", "atmospheric")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"channels listed twice: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if not self.geomorphology and not self.atmospheric:
            raise ValueError("select at least one channel (geomorphology or atmospheric)")
        if self.balance_plan == "random_mix" and not self.balance:
            raise ValueError("data.balance_plan 'random_mix' balances the training epochs: set data.balance to true")
        if self.padding == "reference" and self.policy == "resample":
            raise ValueError("data.padding 'reference' pads once, as the reference's fixed series do; it needs "
                             "data.policy 'enumerate' (resample re-draws every epoch)")
        return self

    @property
    def channels(self) -> list[str]:
        return schema.channel_names(self.geomorphology, self.atmospheric)

    @property
    def epoch_plan(self) -> str:
        """How training epochs are drawn: `balance_plan` when balanced, else `all` (every sample)."""
        return self.balance_plan if self.balance else "all"

    def label_rule_for(self, split: str) -> str:
        """The rule that labels a series of `split` (train: label_rule; val/test: eval_label_rule)."""
        return self.label_rule if split == "train" or self.eval_label_rule is None else self.eval_label_rule


# ---------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    task: Literal["classification", "segmentation"] = "classification"
    # A registry key or, for classification, any timm model name (`thalia-ray models --all`);
    # default: resnet18 / unet. The reference's "deeplabv3" is `deeplabv3plus` (smp DeepLabV3Plus).
    name: str | None = None
    encoder: str = "resnet18"  # smp segmenters: any smp encoder, or tu-<timm model>
    # Initial weights: none (null) | imagenet (timm/smp through the Hugging Face / torch hub caches)
    # | a local state-dict file | run:<RUN_ID> (that stored run's best checkpoint).
    pretrained: str | None = None
    freeze_encoder: float = Field(0.0, ge=0, le=1)  # fraction of encoder layers frozen, input side first
    # Linear probing: the whole encoder frozen, its normalisation statistics too; only the heads learn.
    linear_probe: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    aux_heads: dict[Literal["activity_type", "intensity", "phase", "fringes"], float] = {}

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() == "none":
            return None
        run_id = run_reference(value)
        if run_id is not None:
            try:
                check_id(run_id, "the run id of run:<RUN_ID>")
            except StoreError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is not None:
            check_model_name(info.data.get("task", "classification"), name)
        return name

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, encoder: str, info: ValidationInfo) -> str:
        spec = REGISTRY.get(info.data.get("name") or "unet")
        if info.data.get("task") == "segmentation" and spec is not None and spec.builder.endswith(
                "build_smp_segmenter"):
            check_encoder(encoder)
        return encoder

    @model_validator(mode="after")
    def _default_model(self) -> "ModelConfig":
        if self.name is None:
            self.name = "resnet18" if self.task == "classification" else "unet"
        return self


# ---------------------------------------------------------------------------------------- train
FOCAL_ALPHA_SCALAR = (
    "a single number is ambiguous: the reference's FocalLoss(alpha=0.25) weights the classes "
    "[Non_Deformation, Deformation] = [0.25, 0.75], while this field used to read 0.25 as the Deformation weight "
    "[0.75, 0.25]; write the list: focal_alpha: [0.25, 0.75] (the reference's weighting) or [0.75, 0.25]"
)


class LossConfig(Section):
    name: Literal["ce", "focal", "dice", "ce+dice", "focal+dice"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    # Focal α per class index, [Non_Deformation, Deformation]; null: no α weighting. A single number is
    # refused (FOCAL_ALPHA_SCALAR): the reference's FocalLoss(alpha=0.25) is [0.25, 0.75] (configs/paper/).
    focal_alpha: list[float] | None = [0.75, 0.25]
    # standard: the focal loss of Lin et al., differentiated through its modulating factor (1 − p_t)^γ.
    # reference: that factor detached, as the reference's FocalLoss computes p_t from the log-probability's
    # data, so only the −α_t log p_t part carries gradient (the paper presets). Same values, other gradients.
    focal_form: Literal["standard", "reference"] = "standard"
    class_weights: list[float] | None = None
    confidence_weighting: bool = False

    @field_validator("focal_alpha", mode="before")
    @classmethod
    def _alpha_is_a_list(cls, alpha: Any) -> Any:
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            raise ValueError(FOCAL_ALPHA_SCALAR)
        return alpha

    @field_validator("focal_alpha")
    @classmethod
    def _alpha_range(cls, alpha: list[float] | None) -> list[float] | None:
        if alpha is None:
            return alpha
        if any(not 0 <= a <= 1 for a in alpha):
            raise ValueError(f"focal α weights must lie in [0, 1], got {alpha}")
        if len(alpha) != len(schema.CLASSES):
            raise ValueError(f"give one focal α per class {list(schema.CLASSES)}, got {len(alpha)} values")
        return alpha


def upgrade_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A configuration this service stored before a spelling changed, in today's spelling, meaning the same.

    `train.loss.focal_alpha` was a number, the Deformation weight: a stored α is [1 − α, α]. Only stored
    records are upgraded; a number in a user's config is refused (FOCAL_ALPHA_SCALAR)."""
    loss = raw.get("train", {}).get("loss") if isinstance(raw.get("train"), dict) else None
    if isinstance(loss, dict):
        alpha = loss.get("focal_alpha")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            loss["focal_alpha"] = [1.0 - alpha, float(alpha)]
    return raw


class EarlyStoppingConfig(Section):
    metric: str = key(VAL, LOSS)
    mode: Literal["min", "max"] = "min"
    patience: int | None = Field(None, ge=1)  # None disables early stopping


class TrainConfig(Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # of the real number of optimiser steps
    warmup_epochs: float | None = Field(None, ge=0)  # the warm-up in epochs instead (warmup_fraction must be 0)
    # The warm-up's first rate; null: lr/(warm-up steps + 1). Set, the warm-up is the reference's (timm's
    # CosineLRScheduler warmup_lr_init): the rate is set after each step, from that step's position.
    warmup_start_lr: float | None = Field(None, gt=0)
    # Schedule positions per epoch; null: the real steps per epoch. The reference's ViT schedule counts
    # 2,725 per epoch whatever an epoch holds (train/schedule.py).
    schedule_epoch_steps: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    # When gradients are cleared: before every step, or once per epoch so that each step applies the sum
    # of the epoch's gradients so far (the reference's training loop; the paper presets). train/step.py.
    grad_reset: Literal["step", "epoch"] = "step"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss: LossConfig = Field(default_factory=LossConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    num_workers: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    cpus_per_worker: float = Field(0.5, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    test_best: bool = True  # evaluate the best checkpoint on the test split at the end
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for smoke runs
    # Bitwise-repeatable runs: training batches keep the planned order and kernels are deterministic
    # (slower). Exact with one worker; with several, Ray's streaming split hands blocks to whichever
    # worker asks first, so the per-worker assignment may differ between runs.
    deterministic: bool = False

    @model_validator(mode="after")
    def _one_warmup_length(self) -> "TrainConfig":
        if self.warmup_epochs is not None and self.warmup_fraction:
            raise ValueError(f"train.warmup_epochs {self.warmup_epochs} and train.warmup_fraction {self.warmup_fraction} "
                             "both set the warm-up: set warmup_fraction to 0")
        if self.warmup_start_lr is not None and self.warmup_start_lr >= self.lr:
            raise ValueError(f"train.warmup_start_lr {self.warmup_start_lr} must be below train.lr {self.lr}")
        return self

    @model_validator(mode="after")
    def _grad_reset_fits_precision(self) -> "TrainConfig":
        # fp16's loss scaler unscales all of .grad at each step, so a sum kept across steps would be
        # unscaled again and again.
        if self.grad_reset == "epoch" and self.precision == "fp16":
            raise ValueError("grad_reset 'epoch' keeps gradients across steps, which fp16's loss scaling "
                             "does not allow: set train.precision to fp32 or bf16, or train.grad_reset to step")
        return self


# ------------------------------------------------------------------------------------- pretrain
PretextHead = Literal["coherence", "dem", "era5", "day_of_year", "location", "frame"]
# The cube variables each multi-modal pretext head predicts from the input (MMEarth): they must not be input.
PRETEXT_VARIABLES: dict[str, tuple[str, ...]] = {
    "coherence": ("insar_coherence",), "dem": ("dem",), "era5": schema.ATMOSPHERIC}


class PretrainAugmentConfig(Section):
    """Views made on the device for each batch. One geometric transform per sample moves every plane
    alike (all channels, every member of a series, the pretext targets). Wrapped phase is circular: it
    is resampled through (cos, sin), shifted by a constant modulo 2π, and never brightness-jittered."""

    flip: float = Field(0.5, ge=0, le=1)  # probability of each of a horizontal and a vertical flip
    rotate90: float = Field(0.5, ge=0, le=1)  # probability of a rotation by 90°, 180° or 270°
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area share of the random resized crop; (1, 1): none
    phase_offset: float = Field(1.0, ge=0, le=1)  # probability of a random constant offset per interferogram
    phase_noise: float = Field(0.0, ge=0)  # std (radians) of noise added to the phase before re-wrapping
    jitter: float = Field(0.2, ge=0, lt=1)  # brightness and contrast jitter of non-phase input channels

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"give 0 < low <= high <= 1, got {value}")
        return value


class PretrainConfig(Section):
    """`thalia-ray pretrain`: self-supervised, multi-modal and geo-aware pretext learning on every
    interferogram the cubes hold (thalia_ray/pretrain/). Labels are never read."""

    # auto: mae for ViT backbones, simclr for the others; none: the pretext heads alone.
    method: Literal["auto", "mae", "simclr", "byol", "none"] = "auto"
    # Benchmark periods whose interferograms pretraining reads: by default the training period only, so
    # that the benchmark's validation and test periods stay unseen.
    splits: list[Literal["train", "val", "test"]] = ["train"]
    holdout: float = Field(0.05, gt=0, lt=0.5)  # share of (frame, primary date) groups held out: the validation loss
    method_weight: float = Field(1.0, ge=0)
    heads: dict[PretextHead, float] = {}  # pretext head → loss weight
    mask_ratio: float = Field(0.75, gt=0, lt=1)  # mae
    decoder_dim: int = Field(128, ge=8)  # mae
    decoder_depth: int = Field(2, ge=1)  # mae
    projection_dim: int = Field(128, ge=8)  # simclr, byol
    temperature: float = Field(0.1, gt=0)  # simclr
    momentum: float = Field(0.99, ge=0, lt=1)  # byol: the target network's first EMA rate, rising to 1
    vmf_components: int = Field(24, ge=1)  # location: mixture components, centres spread over the sphere
    augment: PretrainAugmentConfig = Field(default_factory=PretrainAugmentConfig)

    @field_validator("splits")
    @classmethod
    def _some_splits(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"name each benchmark period once, at least one: {value}")
        return value

    @model_validator(mode="after")
    def _something_to_learn(self) -> "PretrainConfig":
        if self.method == "none" and not any(self.heads.values()):
            raise ValueError("method 'none' needs at least one pretext head with a positive weight in pretrain.heads")
        return self


# -------------------------------------------------------------------------------- storage/runtime
class CacheConfig(Section):
    """The node-local cache of object-storage reads (thalia_ray/node_cache.py): each node keeps the
    chunks and shard ranges it fetched in a folder on its own disk, shared by its readers."""

    enabled: bool = False
    path: str = Field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "thalia-ray-cache"))
    max_gb: float = Field(50.0, gt=0)  # the folder's size limit; least recently used entries go first


class StorageConfig(Section):
    """Where results go, and how data is read from object storage. Credentials never live here: they
    come from the environment."""

    store: str = "./runs"
    endpoint_url: str | None = None  # S3-compatible endpoint; AWS_ENDPOINT_URL is used when unset
    region: str | None = None
    timeout_s: float = Field(60.0, gt=0)  # longest wait for one storage call, retries included
    # The data path's GETs (thalia_ray/object_reads.py): requests in flight per reader process (hides a
    # bucket's latency whatever CPUs the reader holds), one request's deadline (a stall past it is
    # retried) and attempts per request (throttling, resets and stalls are retried with back-off).
    requests_in_flight: int = Field(64, ge=1, le=1024)
    request_timeout_s: float = Field(10.0, gt=0)
    request_attempts: int = Field(8, ge=1, le=20)
    request_price_per_1000: float = Field(DEFAULT_REQUEST_PRICE, ge=0)  # of 1,000 GETs: the cost in runs show/report
    cache: CacheConfig = Field(default_factory=CacheConfig)


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "thalia-ray"
    entity: str | None = None
    group: str | None = None  # sweeps group their trials' runs under the sweep id


class MlflowConfig(Section):
    """MLflow, when `runtime.tracking` lists it. Credentials for a server come from MLFLOW_* env vars."""

    tracking_uri: str | None = None  # None: the store's SQLite database, {store}/tracking/mlflow.db
    experiment: str = "thalia-ray"


Tracker = Literal["wandb", "tensorboard", "mlflow"]


class RuntimeConfig(Section):
    address: str | None = None  # RAY_ADDRESS wins when set; otherwise a local Ray is started
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: int | None = Field(None, ge=78_643_200)
    data_cpu_limit: float | None = Field(None, gt=0)  # busy read processes for Ray Data (pipeline.data_budget)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    # Trackers each run writes to: {run}/tracking/{tensorboard,wandb}/ and {store}/tracking/mlflow.db.
    tracking: list[Tracker] = ["wandb", "tensorboard"]
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


# ---------------------------------------------------------------------------------------- sweep
class Dimension(Section):
    """One search dimension: exactly one of the keys is set."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Dimension":
        set_keys = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError(
                f"give exactly one of {list(type(self).model_fields)}, got {set_keys or 'none'}"
            )
        return self

    def examples(self) -> list[Any]:
        """Representative values, used to validate the dimension against the run config."""
        kind = next(k for k in type(self).model_fields if getattr(self, k) is not None)
        return list(getattr(self, kind))


class SweepConfig(Section):
    name: str | None = None
    search: Literal["grid", "random", "optuna"] = "grid"
    space: dict[str, Dimension] = {}
    num_samples: int = Field(1, ge=1)  # samples per grid point (grid) or trials (random/optuna)
    seeds: list[int] = [0]
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: str = key(VAL, F1)
    mode: Literal["min", "max"] = "max"
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int = Field(2, ge=1)


# ----------------------------------------------------------------------------------------- root
class ThaliaConfig(Section):
    name: str = "thalia"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sweep: SweepConfig | None = None

    @model_validator(mode="after")
    def _pretext_targets_are_not_inputs(self) -> "ThaliaConfig":
        inputs = {schema.statistics_key(c) for c in self.data.channels}
        for head, variables in PRETEXT_VARIABLES.items():
            given = inputs.intersection(variables)
            if self.pretrain.heads.get(head) and given:
                raise ValueError(f"pretrain.heads.{head} predicts {sorted(given)} from the other channels; "
                                 "remove it from data.geomorphology / data.atmospheric")
        return self

    @model_validator(mode="after")
    def _no_credentials(self) -> "ThaliaConfig":
        """A configuration is stored with every run and travels in job specs: a credential-shaped value
        (a URL with a password, a key) is refused, naming its field, never quoting it."""
        found = scan_tree(self.model_dump(mode="json"))
        if found:
            raise ValueError(f"{', '.join(map(str, found))}: credentials come from the environment or a secret "
                             "reference, never from a configuration (it is stored with every run)")
        return self

    @model_validator(mode="after")
    def _sweep_space_fits(self) -> "ThaliaConfig":
        if self.sweep is None:
            return self
        base = self.model_dump(mode="json", exclude={"sweep"})
        for path, dim in self.sweep.space.items():
            for value in dim.examples():
                trial = set_dotted(copy.deepcopy(base), path, value)
                try:
                    ThaliaConfig.model_validate(trial)
                except ValidationError as err:
                    raise ValueError(f"sweep.space[{path!r}] value {excerpt(value)}: {_format(err)}") from None
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, values: dict[str, Any]) -> "ThaliaConfig":
        """A copy with dotted-path values applied (sweep trials use this), validated again."""
        raw = self.model_dump(mode="json")
        for path, value in values.items():
            set_dotted(raw, path, value)
        return validate(raw)


# -------------------------------------------------------------------------------------- loading
def set_dotted(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set `a.b.c` in nested dicts, creating intermediate dicts; returns `raw`."""
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{excerpt(path)}: {excerpt(key)} is a value, not a section")
        node = child
    node[keys[-1]] = value
    return raw


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "model.name=resnet18"]` → `{path: YAML-parsed value}`."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"override {excerpt(item)} is not of the form section.field=value")
        try:
            parsed[path.strip()] = safe_yaml.load(text) if text.strip() else None
        except safe_yaml.YamlError as err:
            raise ConfigError(f"--set {excerpt(item)}: the value is not valid YAML ({err})") from None
    return parsed


def _allowed_fields(loc: tuple[Any, ...]) -> list[str] | None:
    """Field names allowed at the parent of `loc`, for 'unknown key' messages."""
    model: Any = ThaliaConfig
    for key in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return list(model.model_fields) if model is not None else None


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(loc)
            msg = f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
        shown = e["type"] != "missing" and not isinstance(e.get("input"), dict)
        got = f" (got {excerpt(e.get('input'))})" if shown else ""
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


def validate(raw: dict[str, Any]) -> ThaliaConfig:
    try:
        return ThaliaConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("invalid configuration:\n" + _format(err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing, unreadable, binary, malformed or empty file (or one with
    duplicate keys or an alias bomb: see `safe_yaml`) is a ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a configuration file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a YAML configuration is UTF-8 text)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the configuration ({err.strerror or err})") from None
    try:
        raw = safe_yaml.load(text)
    except safe_yaml.YamlError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raise ConfigError(f"{path}: empty (no sections, only blank lines or comments); give at least one section, "
                          "or leave the file out to run on the defaults")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ThaliaConfig:
    """Defaults, then the YAML file (if any), then `--set` overrides; validated as a whole."""
    raw = read_yaml(path) if path else {}
    for dotted, value in parse_overrides(overrides).items():
        set_dotted(raw, dotted, value)
    return validate(raw)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dump (e.g. `cfg.model_dump()`) as `{dotted.path: leaf}`, the paths `--set` takes."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat
