"""`thalia-ray demo`: the whole service end to end on a local single-node Ray, sized for a 2-core laptop.

synthetic dataset → WebDataset shards → classifier (from shards) → segmenter (from minicubes) → backbone sweep
with ASHA → leaderboard → an HTML report of the best run. Every stage is the real code path with small sizes;
nothing is faked.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from thalia_ray.config import ThaliaConfig, load_config
from thalia_ray.metric_names import AUROC, F1, IOU, TEST, VAL, key

if TYPE_CHECKING:
    from thalia_ray.train.trainer import TrainResult

# Sized for a 2-core laptop (about five minutes in all) and for models that learn: `thalia-ray bench
# learnability` shows how the test AUROC grows with training steps on this data (BENCHMARKS.md).
DEMO_OVERRIDES = [
    "name=demo",
    "data.crop=48",
    "data.synthetic.frames=4",
    "data.synthetic.size=96",
    "data.synthetic.max_groups_per_frame=40",
    "train.epochs=3",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "runtime.wandb.mode=offline",
]
# Each model trains until it has learnt (about 100 steps of 2 × 8 samples); the sweep's trials are short
# (each trial spends most of its time starting: a second wave of trials would add about 70 s).
CLASSIFIER = {"name": "demo-cls", "train.epochs": 16}
SEGMENTER = {"name": "demo-seg", "model.task": "segmentation", "model.name": "unet", "train.loss.name": "ce+dice",
             "train.epochs": 10, "train.early_stopping.metric": key(VAL, IOU),
             "train.early_stopping.mode": "max"}  # the checkpoint tested: the best validation IoU
SWEEP = {
    "name": "demo-backbones",
    "search": "grid",
    "space": {"model.name": {"grid": ["resnet18", "mobilenetv3_small"]}},  # one wave: two trials at a time
    "scheduler": "asha",
    "metric": key(VAL, F1),
    "mode": "max",
    "grace_period": 1,
    "reduction_factor": 2,
    "max_concurrent_trials": 2,
}


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.time()


def _done(started: float) -> None:
    print(f"    ({time.time() - started:.0f} s)", flush=True)


def demo_config(workdir: Path, overrides: Sequence[str] = ()) -> ThaliaConfig:
    base = [f"data.root={workdir / 'data' / 'thalia-synthetic'}", f"storage.store={workdir / 'runs'}"]
    return load_config(None, [*DEMO_OVERRIDES, *base, *overrides])


def run_demo(workdir: str = ".", overrides: Sequence[str] = ()) -> int:
    from thalia_ray import runtime
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.shards.export import export_shards
    from thalia_ray.storage import S3Options
    from thalia_ray.synthetic.generator import synthesize
    from thalia_ray.report.page import write_report
    from thalia_ray.store import ExperimentStore
    from thalia_ray.leaderboard import best_run
    from thalia_ray.train.trainer import fit
    from thalia_ray.tune.driver import run_sweep, trials_table
    from thalia_ray.tune.space import varied_fields

    root = Path(workdir).resolve()
    cfg = demo_config(root, overrides)
    shards = root / "data" / "shards"
    began = time.time()
    with runtime.start(cfg.runtime):  # quiet: Ray internals only at runtime.log_level DEBUG
        t = _stage(f"1/5 synthetic Thalia minicubes → {cfg.data.root}")
        syn = cfg.data.synthetic
        report = synthesize(cfg.data.root, frames=syn.frames, size=syn.size, seed=syn.seed,
                            max_groups_per_frame=syn.max_groups_per_frame, workers=2, progress=print)
        print(f"    {report.frames} frames, {report.pairs} interferograms, {report.groups} series")
        _done(t)

        t = _stage(f"2/5 WebDataset shards (Ray tasks) → {shards}")
        exported = export_shards(cfg.data, DataLocations.of(cfg.data, S3Options.of(cfg.storage)), str(shards),
                                 cfg.data.length)
        print(f"    {exported.shards_written} shards written, {exported.shards_kept} kept, "
              f"{sum(exported.samples.values())} samples {exported.samples}, {exported.bytes / 1e6:.1f} MB")
        _done(t)

        t = _stage("3/5 classifier (resnet18) trained from the shards, 2 Ray Train workers")
        classifier = fit(cfg.with_overrides({**CLASSIFIER, "data.source": "shards", "data.shards": str(shards)}))
        print(f"    {classifier}\n    {learning(classifier, AUROC)}")
        store = ExperimentStore.of(cfg.storage)
        print(f"    its learning curves, ROC and gallery: {write_report(store, classifier.run_id).url}")
        _done(t)

        t = _stage("4/5 segmenter (UNet) trained from the minicubes, 2 Ray Train workers")
        segmenter = fit(cfg.with_overrides(SEGMENTER))
        print(f"    {segmenter}\n    {learning(segmenter, IOU)}")
        _done(t)

        t = _stage("5/5 backbone sweep from the shards: 2 families side by side, ASHA, 1 worker per trial")
        sweep_cfg = cfg.with_overrides({"sweep": SWEEP, "train.num_workers": 1, "data.source": "shards",
                                        "data.shards": str(shards)})
        summary = run_sweep(sweep_cfg)
        _done(t)

    print("\n=== sweep results")
    print(trials_table(summary, varied_fields(sweep_cfg.sweep), (key(TEST, F1), key(TEST, AUROC))))
    print(f"every metric: thalia-ray leaderboard {summary.sweep_id} --store {store.root.url}; the best run by "
          f"frame, intensity or activity type: add --breakdown frame_id|intensity|activity_type")
    print(f"learning curves of every run: tensorboard --logdir {store.runs_root.url} "
          f"(W&B: wandb sync {store.runs_root.url}/ID/tracking/wandb/offline-run-*)")
    if "mlflow" in cfg.runtime.tracking:
        from thalia_ray.train.mlflow_store import view_command

        print(f"every run in MLflow: {view_command(store)}")
    print(f"\nfinished in {time.time() - began:.0f} s")
    print(f"results: {store.root.url} (list them: thalia-ray runs --store {store.root.url})")
    print(f"sweep summary: {store.root.url}/sweeps/{summary.sweep_id}/summary.json")
    best, selection = best_run(store, summary.sweep_id)  # the sweep's own choice: its Tune metric, on validation
    print(f"report of the best run ({best.run_id}, by {selection.metric}): {write_report(store, best.run_id).url}")
    return 0


def learning(result: TrainResult, metric: str) -> str:
    """The learning in one line: `metric` of the validation split at every epoch, then of the test split."""
    curve = " ".join(f"{row[key(VAL, metric)]:.2f}" for row in result.history if key(VAL, metric) in row)
    test = result.test_metrics.get(key(TEST, metric))
    return f"val {metric} by epoch: {curve}" + (f"; test {test:.3f}" if test is not None else "")
