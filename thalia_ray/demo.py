"""`thalia-ray demo`: the whole service end to end on a local single-node Ray, sized for a 2-core laptop.

synthetic dataset → WebDataset shards → classifier (from shards) → segmenter (from minicubes) → backbone sweep
with ASHA → leaderboard → an HTML report of the best run. Every stage is the real code path with small sizes;
nothing is faked.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from thalia_ray.config import ThaliaConfig, load_config

# Small enough for ~minutes on 2 CPU cores, large enough that models learn something.
DEMO_OVERRIDES = [
    "name=demo",
    "data.crop=48",
    "data.synthetic.frames=4",
    "data.synthetic.size=96",
    "data.synthetic.max_groups_per_frame=20",
    "train.epochs=3",
    "train.batch_size=16",
    "train.lr=1e-3",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "train.max_steps_per_epoch=12",
    "runtime.wandb.mode=offline",
]
SWEEP = {
    "name": "demo-backbones",
    "search": "grid",
    "space": {"model.name": {"grid": ["resnet18", "mobilenetv3_small"]}, "train.lr": {"grid": [1e-3, 3e-4]}},
    "scheduler": "asha",
    "metric": "val/f1_deformation",
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
    from thalia_ray.data.shards.export import export_shards
    from thalia_ray.data.synthetic.generator import synthesize
    from thalia_ray.report.page import write_report
    from thalia_ray.store import ExperimentStore
    from thalia_ray.store.leaderboard import best_run, leaderboard_text
    from thalia_ray.train.trainer import fit
    from thalia_ray.tune.driver import run_sweep

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
        exported = export_shards(cfg.data, str(shards), cfg.data.length)
        print(f"    {exported.shards_written} shards written, {exported.shards_kept} kept, "
              f"{sum(exported.samples.values())} samples {exported.samples}, {exported.bytes / 1e6:.1f} MB")
        _done(t)

        t = _stage("3/5 classifier (resnet18) trained from the shards, 2 Ray Train workers")
        cls = cfg.with_overrides({"name": "demo-cls", "data.source": "shards", "data.shards": str(shards)})
        print(f"    {fit(cls)}")
        _done(t)

        t = _stage("4/5 segmenter (UNet) trained from the minicubes, 2 Ray Train workers")
        seg = cfg.with_overrides({"name": "demo-seg", "model.task": "segmentation", "model.name": "unet",
                                  "train.loss.name": "ce+dice"})
        print(f"    {fit(seg)}")
        _done(t)

        t = _stage("5/5 backbone sweep: 2 families × 2 learning rates, ASHA, 1 worker per trial")
        sweep_cfg = cfg.with_overrides({"sweep": SWEEP, "train.num_workers": 1})
        summary = run_sweep(sweep_cfg)
        _done(t)

    store = ExperimentStore(cfg.storage.store, cfg.storage)
    print("\n=== leaderboard (sweep)")
    print(leaderboard_text(store, summary.sweep_id, fmt="terminal", breakdown_by=()))
    print(f"the best run by frame, intensity or activity type (also in its report): thalia-ray leaderboard "
          f"{summary.sweep_id} --store {store.root.url} --breakdown frame_id|intensity|activity_type")
    print(f"\nfinished in {time.time() - began:.0f} s")
    print(f"results: {store.root.url} (list them: thalia-ray runs --store {store.root.url})")
    print(f"sweep summary: {store.root.url}/sweeps/{summary.sweep_id}/summary.json")
    best, selection = best_run(store, summary.sweep_id)  # the sweep's own choice: its Tune metric, on validation
    print(f"report of the best run ({best.run_id}, by {selection.metric}): {write_report(store, best.run_id).url}")
    return 0
