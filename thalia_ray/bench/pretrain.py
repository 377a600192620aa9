"""What pretraining buys: a label-efficiency study, and pretraining's throughput against supervised training.

Label efficiency. On one synthetic dataset, each pretraining method runs as an ordinary `thalia-ray
pretrain` run (all series of the training period, no label); then, per backbone, one sweep fine-tunes a
classifier from every arm (random initialisation, ImageNet weights where the offline caches hold them,
each pretraining run: `model.pretrained` is a sweep dimension) on 5 %, 20 % and 100 % of the labelled
training series (`data.label_fraction`: a fixed, nested subset per seed, the same for every arm) and
several seeds, with the same budget for every arm (epochs, steps per epoch, learning rate, batch), and
tests each run's best checkpoint on the test split. The study reports test AUROC and AP of the
Deformation class, mean and spread over the seeds, as a table and a plot.

Throughput. The same cubes streamed by the same Ray Data pipeline into a consumer, for supervised training
(the balanced labelled draw: channels and mask) and for pretraining (every series: the input channel and
the multi-modal targets, the same variables without the mask), in samples/s; and both end to end, a
training run each (`time/samples_per_s` of the epochs after the first), where the models' work differs
(pretraining's contrastive method runs the backbone on two views of each sample).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from thalia_ray.bench.harness import BenchResult, Rep
from thalia_ray.config import ThaliaConfig, load_config

RANDOM, IMAGENET = "random init", "imagenet"
METRICS = ("test/auroc_deformation", "test/ap_deformation")
CNN_METHODS = ("simclr", "byol")


@dataclass(frozen=True)
class Arm:
    """One initialisation of one backbone: `pretrained` is model.pretrained (None, imagenet, run:<ID>)."""

    backbone: str
    label: str
    pretrained: str | None

    @property
    def name(self) -> str:
        return f"{self.backbone} · {self.label}"


@dataclass(frozen=True)
class StudySetup:
    data_root: str
    store: str
    fractions: Sequence[float]
    seeds: Sequence[int]
    cnn: str
    vit: str
    methods: Sequence[str]
    crop: int
    batch_size: int
    epochs: int
    max_steps: int
    pretrain_epochs: int
    pretrain_batch_size: int
    pretrain_max_steps: int
    lr: float
    concurrent: int = 2
    workers: int = 1
    cpus_per_worker: float = 0.5
    heads: Mapping[str, float] = field(default_factory=lambda: {"coherence": 1.0, "dem": 1.0, "day_of_year": 0.5,
                                                                 "frame": 0.5})

    def base(self, name: str, backbone: str, *extra: str) -> ThaliaConfig:
        """What every run of the study shares: data (the phase as input), budget, resources."""
        return load_config(None, [
            f"name={name}", f"data.root={self.data_root}", f"storage.store={self.store}", f"data.crop={self.crop}",
            "data.geomorphology=[insar_difference]", f"model.name={backbone}", f"train.lr={self.lr}",
            f"train.num_workers={self.workers}", f"train.cpus_per_worker={self.cpus_per_worker}", "train.max_failures=0",
            "runtime.wandb.mode=disabled", "runtime.tracking=[]", *extra])

    def pretraining(self, method: str) -> ThaliaConfig:
        backbone = self.vit if method == "mae" else self.cnn
        heads = "{" + ", ".join(f"{k}: {v}" for k, v in self.heads.items()) + "}"
        return self.base(f"bench-pretrain-{method}", backbone, f"pretrain.method={method}", f"pretrain.heads={heads}",
                         f"train.epochs={self.pretrain_epochs}", f"train.batch_size={self.pretrain_batch_size}",
                         f"train.max_steps_per_epoch={self.pretrain_max_steps}")

    def fine_tuning(self, backbone: str, arms: Sequence[Arm]) -> ThaliaConfig:
        cfg = self.base(f"bench-finetune-{backbone}", backbone, f"train.epochs={self.epochs}",
                        f"train.batch_size={self.batch_size}", f"train.max_steps_per_epoch={self.max_steps}",
                        "train.early_stopping.metric=val/loss", "train.early_stopping.mode=min")
        return cfg.with_overrides({"sweep": {
            "name": f"bench-finetune-{backbone}", "search": "grid", "scheduler": "fifo",  # same budget for all
            "space": {"model.pretrained": {"grid": [a.pretrained for a in arms]},
                      "data.label_fraction": {"grid": list(self.fractions)}},
            "seeds": list(self.seeds), "metric": "val/loss", "mode": "min", "max_concurrent_trials": self.concurrent,
        }})


def imagenet_missing(backbone: str) -> str | None:
    """None when `backbone`'s ImageNet weights are in the local caches (the study never downloads), else why
    the arm is left out."""
    import os

    import torch.hub
    from huggingface_hub import try_to_load_from_cache

    from thalia_ray.models.pretrained import hub_caches, weights_repo
    from thalia_ray.models.registry import get_spec

    repo = weights_repo(get_spec(backbone), "")
    if repo.startswith(("http://", "https://")):
        cached = os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(repo)))
    else:
        hub_id = repo.partition("@")[0]
        cached = any(isinstance(try_to_load_from_cache(hub_id, name), str)
                     for name in ("model.safetensors", "pytorch_model.bin"))
    return None if cached else f"its ImageNet weights ({repo}) are not in the local caches ({hub_caches()})"


def pretrain_arms(setup: StudySetup) -> tuple[list[Arm], list[str]]:
    """Run each pretraining method once; its arm fine-tunes from the run. Returns (arms, notes)."""
    from thalia_ray.pretrain.run import check, pretrain
    from thalia_ray.store import ExperimentStore

    arms, notes = [], []
    store = ExperimentStore(setup.store)
    for method in setup.methods:
        cfg = setup.pretraining(method)
        result = pretrain(cfg, store=store, objective=check(cfg))
        arms.append(Arm(cfg.model.name or "?", method, f"run:{result.run_id}"))
        last = result.history[-1] if result.history else {}
        notes.append(f"pretraining {method} ({cfg.model.name}): run {result.run_id}, {len(result.history)} epochs, "
                     f"val loss {last.get('val/loss', math.nan):.4f}, {last.get('time/samples_per_s', math.nan):.1f} "
                     "samples/s in its last epoch")
    return arms, notes


def all_arms(setup: StudySetup, pretrained: Sequence[Arm]) -> tuple[list[Arm], list[str]]:
    """Random initialisation and (where cached) ImageNet for each backbone, then the pretrained arms."""
    arms, notes = [], []
    for backbone in dict.fromkeys(a.backbone for a in pretrained):
        arms.append(Arm(backbone, RANDOM, None))
        missing = imagenet_missing(backbone)
        if missing is None:
            arms.append(Arm(backbone, IMAGENET, IMAGENET))
        else:
            notes.append(f"{backbone} · imagenet left out: {missing}")
    return arms + list(pretrained), notes


def fine_tune(setup: StudySetup, arms: Sequence[Arm]) -> dict[tuple[str, float], list[dict[str, float]]]:
    """(arm name, label fraction) → each seed's test metrics, from one sweep per backbone."""
    from thalia_ray.store import ExperimentStore
    from thalia_ray.tune.driver import run_sweep

    store = ExperimentStore(setup.store)
    outcomes: dict[tuple[str, float], list[dict[str, float]]] = {}
    for backbone in dict.fromkeys(a.backbone for a in arms):
        mine = [a for a in arms if a.backbone == backbone]
        by_pretrained = {a.pretrained: a for a in mine}
        summary = run_sweep(setup.fine_tuning(backbone, mine))
        if summary.status != "finished":
            raise RuntimeError(f"fine-tuning sweep {summary.sweep_id} failed: {'; '.join(summary.errors)[:800]}")
        for trial in summary.trials:
            cfg = store.run(trial["run_id"]).read_config()
            results = store.run(trial["run_id"]).read_results() or {}
            arm = by_pretrained[cfg.model.pretrained]
            values = {m: float(results.get("metrics", {}).get(m, math.nan)) for m in METRICS}
            outcomes.setdefault((arm.name, cfg.data.label_fraction), []).append({"seed": cfg.seed, **values})
    return outcomes


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (NaN values, e.g. a test split of one class, left out)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def table(outcomes: Mapping[tuple[str, float], list[dict[str, float]]], arms: Sequence[str],
          fractions: Sequence[float]) -> list[str]:
    """Markdown rows: per arm, test AUROC and AP (mean ± std over seeds) at each label fraction."""
    head = "| arm | " + " | ".join(f"{100 * f:g} % AUROC | {100 * f:g} % AP" for f in fractions) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(fractions))]
    for arm in arms:
        cells = []
        for fraction in fractions:
            runs = outcomes.get((arm, fraction), [])
            for metric in METRICS:
                mean, spread = mean_spread([r[metric] for r in runs])
                cells.append(f"{mean:.3f} ± {spread:.3f}" if not math.isnan(mean) else "–")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def plot(outcomes: Mapping[tuple[str, float], list[dict[str, float]]], arms: Sequence[str],
         fractions: Sequence[float]) -> bytes:
    """Test AUROC and AP against the share of labels (log scale), one line per arm, bars: ± one std."""
    from thalia_ray.report.figures import plt, png

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, METRICS):
        for arm in arms:
            stats = [mean_spread([r[metric] for r in outcomes.get((arm, f), [])]) for f in fractions]
            ax.errorbar([100 * f for f in fractions], [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=arm)
        ax.set(xscale="log", xlabel="labelled training series (%)", ylabel=metric.split("/")[1],
               title=f"{metric} (mean ± std over seeds)")
        ax.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    return png(fig)


def label_efficiency(setup: StudySetup, result: BenchResult) -> None:
    """The study (module docstring) into `result`: one series per arm and fraction (reps: seeds), the
    table in the notes, the plot as a figure."""
    pretrained, notes = pretrain_arms(setup)
    arms, skipped = all_arms(setup, pretrained)
    outcomes = fine_tune(setup, arms)
    names = [a.name for a in arms]
    for arm in names:
        for fraction in setup.fractions:
            reps = [Rep(r["test/auroc_deformation"], 0.0, {"ap": r["test/ap_deformation"], "seed": r["seed"]})
                    for r in outcomes.get((arm, fraction), [])]
            if reps:
                result.add(f"{arm}, {100 * fraction:g} % labels", "test AUROC", reps)
    result.notes += [*notes, *skipped, *table(outcomes, names, setup.fractions)]
    result.figures["label-efficiency"] = plot(outcomes, names, setup.fractions)


# ------------------------------------------------------------------------------------ throughput
def stream_configs(root: str, p: Mapping[str, Any]) -> tuple[ThaliaConfig, ThaliaConfig]:
    """(supervised, pretraining) configs reading the same variables of the same cubes at the same crop."""
    common = [f"data.root={root}", f"data.crop={p['crop']}", f"data.length={p['length']}",
              f"train.batch_size={p['batch_size']}", "runtime.wandb.mode=disabled", "runtime.tracking=[]",
              f"model.name={p['model']}", "train.num_workers=1", f"train.cpus_per_worker={p['cpus_per_worker']}",
              f"train.epochs={p['epochs']}", "train.max_steps_per_epoch=null", "train.test_best=false",
              "train.early_stopping.patience=null", "data.augmentations=false"]
    supervised = load_config(None, [*common, "data.geomorphology=[insar_difference, insar_coherence, dem]"])
    pretraining = load_config(None, [*common, "data.geomorphology=[insar_difference]", f"pretrain.method={p['method']}",
                                     "pretrain.heads={coherence: 1.0, dem: 1.0}"])
    return supervised, pretraining
