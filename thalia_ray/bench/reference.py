"""What the remaining choices between the reference's forms and ours do to the reported metrics.

`thalia-ray bench reference` trains a paper preset scaled down to synthetic data (its reference forms:
focal loss with the modulating factor detached, the reference's padding draws, RandomMix epochs) and,
with the same seeds, each variant that changes one of those forms back to this service's default. One
worker, deterministic kernels: a variant and the preset start from the same weights, so the paired
difference of a test metric is the variant's effect (plus the chaos of training, which the spread over
seeds shows). It also scores the preset's test logits as the reference does (raw logits per batch of 2,
softmax only when a value lies outside [0, 1]) beside the service's softmax probabilities.

The values are test metrics, not rates: "higher is better" still holds for each series, but the
suite sets no target ratio; docs/reference-differences.md quotes its figures.
"""
from __future__ import annotations

import tempfile
from typing import Any, Mapping

from thalia_ray.bench.harness import BenchResult, Rep

Params = dict[str, Any]
METRICS = {"classification": ("ap_deformation", "f1_deformation"), "segmentation": ("iou_deformation", "f1_deformation")}
# preset, variant label -> the overrides that turn one reference form back into the service's default
VARIANTS: Mapping[str, Mapping[str, list[str]]] = {
    "cls-series": {
        "focal_form standard": ["train.loss.focal_form=standard"],
        "padding per_group": ["data.padding=per_group"],
        "balance_plan equal": ["data.balance_plan=equal"],
    },
    "seg-single": {"focal_form standard": ["train.loss.focal_form=standard"]},
}


def reference_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Paired runs of each preset and its variants over `repeats` seeds (see the module docstring)."""
    from thalia_ray.data.index import SampleIndex
    from thalia_ray.synthetic.generator import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/data"
        synthesize(root, frames=p["frames"], size=p["size"], seed=p["data_seed"], max_groups_per_frame=p["groups"])
        for preset, variants in VARIANTS.items():
            runs = {label: [_run(p, root, tmp, preset, overrides, seed) for seed in range(repeats)]
                    for label, overrides in {"preset": [], **variants}.items()}
            _record(result, preset, runs)
            counts = SampleIndex.from_config(runs["preset"][0]["cfg"].data, 0).counts()
            result.notes.append(f"{preset}: " + ", ".join(f"{split} {c['samples']} samples ({c['positives']} positive)"
                                                          for split, c in counts.items()))
            if preset.startswith("cls"):
                _record_ap_inputs(result, preset, runs["preset"])
    result.notes.append(f"synthetic data: {p['frames']} frames of {p['size']}², {p['groups']} groups per frame "
                        f"(generator seed {p['data_seed']}); crop {p['crop']}, model {p['model']} / unet-resnet18, "
                        f"{p['epochs']} epochs, batch 2, AdamW lr {p['lr']:g} (the presets' 1e-5 is for 90 epochs from "
                        f"ImageNet weights), no pretrained weights, one worker, deterministic; seeds 0..{repeats - 1}")


def _run(p: Params, root: str, tmp: str, preset: str, overrides: list[str], seed: int) -> dict[str, Any]:
    from pathlib import Path

    from thalia_ray.config import load_config
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.train.trainer import fit

    path = Path(__file__).resolve().parents[2] / "configs" / "paper" / f"{preset}.yaml"
    model = [f"model.name={p['model']}"] if preset.startswith("cls") else []
    cfg = load_config(path, [
        f"data.root={root}", f"data.crop={p['crop']}", "model.pretrained=none", *model, f"seed={seed}",
        f"train.epochs={p['epochs']}", f"train.lr={p['lr']}", "train.device=auto", "train.cpus_per_worker=1",
        "train.deterministic=true", "train.max_failures=0", f"storage.store={tmp}/store",
        "runtime.tracking=[]", "runtime.wandb.mode=disabled", *overrides])
    store = ExperimentStore.of(cfg.storage)
    outcome = fit(cfg, store=store)
    return {"cfg": cfg, "metrics": outcome.test_metrics, "checkpoint": outcome.checkpoint, "store": store,
            "run_id": outcome.run_id}


def _record(result: BenchResult, preset: str, runs: Mapping[str, list[dict[str, Any]]]) -> None:
    task = runs["preset"][0]["cfg"].model.task
    for metric in METRICS[task]:
        key = f"test/{metric}"
        base = [r["metrics"][key] for r in runs["preset"]]
        result.add(f"{preset} preset: {key}", metric, [Rep(v, 0.0) for v in base])
        for label, variant in runs.items():
            if label != "preset":
                result.add(f"{preset} {label} − preset: {key}", "Δ " + metric,
                           [Rep(r["metrics"][key] - b, 0.0) for r, b in zip(variant, base)])


def _record_ap_inputs(result: BenchResult, preset: str, runs: list[dict[str, Any]]) -> None:
    """The preset runs' test logits scored the reference's way minus the service's way (AP with five
    thresholds and AUROC of Deformation), and the share of batches of 2 whose logits all lie in [0, 1]."""
    reps: dict[str, list[Rep]] = {"ap5_deformation": [], "auroc_deformation": [], "raw batches": []}
    for run in runs:
        scores = reference_scores(run)
        for name in ("ap5_deformation", "auroc_deformation"):
            reps[name].append(Rep(scores["reference"][name] - scores["service"][name], 0.0))
        reps["raw batches"].append(Rep(scores["raw_batches"], 0.0))
    for name in ("ap5_deformation", "auroc_deformation"):
        result.add(f"{preset} preset: test/{name}, raw logits per batch of 2 − softmax", "Δ " + name, reps[name])
    result.add(f"{preset} preset: test batches of 2 with every logit in [0, 1]", "share", reps["raw batches"])


def reference_scores(run: Mapping[str, Any]) -> dict[str, Any]:
    """AP (5 thresholds) and AUROC of Deformation on the test split from the run's best checkpoint:
    updated per batch of 2 with raw logits, as the reference's `test` does, and with softmax
    probabilities, as the service does."""
    import torch
    from ray.train import Checkpoint
    from torchmetrics.classification import MulticlassAUROC, MulticlassAveragePrecision

    from thalia_ray.data.pipeline import TorchCollate, build_datasets
    from thalia_ray.metrics import REFERENCE_AP_THRESHOLDS
    from thalia_ray.train.evaluate import load_model

    cfg = run["cfg"]
    model = load_model(cfg, Checkpoint(run["checkpoint"], filesystem=run["store"].ray_storage()[0])).eval()
    kinds = ("reference", "service")
    metrics = {k: (MulticlassAveragePrecision(2, average=None, thresholds=REFERENCE_AP_THRESHOLDS),
                   MulticlassAUROC(2, average=None)) for k in kinds}
    batches = raw = 0
    data = build_datasets(cfg, splits=("test",))
    with torch.no_grad():
        for batch in data.datasets["test"].iter_torch_batches(batch_size=2, collate_fn=TorchCollate()):
            logits, label = model(batch["image"])["logits"].float(), batch["label"].long()
            batches += 1
            raw += bool(((logits >= 0) & (logits <= 1)).all())
            for kind, inputs in zip(kinds, (logits, logits.softmax(dim=1))):
                for metric in metrics[kind]:
                    metric.update(inputs, label)
    return {**{k: {"ap5_deformation": float(m[0].compute()[1]), "auroc_deformation": float(m[1].compute()[1])}
               for k, m in metrics.items()}, "raw_batches": raw / max(batches, 1)}
