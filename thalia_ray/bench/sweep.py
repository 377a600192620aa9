"""Sweep efficiency: what ASHA saves against running the full grid to the end.

Both sweeps search the same space (backbones × learning rates) with the same seeds, data and epoch
budget; the grid is the same sweep under the FIFO scheduler, so every trial trains every epoch; trials
are deterministic (`train.deterministic`), so a trial's epochs are identical in both sweeps. The
cost of a sweep is its worker-seconds (epoch wall time × workers, summed over trials, from the store's
run histories). ASHA "reaches" the grid when its best validation F1 is within 1 % of the grid's best;
the saving is only meaningful when it does, which `reached` says.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from thalia_ray.bench.harness import Rep
from thalia_ray.config import ThaliaConfig, load_config

TOLERANCE = 0.01  # "within 1 % of the grid's best"


@dataclass(frozen=True)
class SweepSetup:
    data_root: str
    store: str
    backbones: Sequence[str] = ("resnet18", "mobilenetv3_small")
    lrs: Sequence[float] = (1e-3, 3e-4)
    epochs: int = 3
    crop: int = 32
    batch_size: int = 8
    max_steps_per_epoch: int = 4
    seeds: Sequence[int] = (0,)
    concurrent: int = 2
    extra: Sequence[str] = field(default=())  # further `section.key=value` overrides

    def config(self, scheduler: str) -> ThaliaConfig:
        """The base run config plus a sweep section; only `sweep.scheduler` differs between the two sides."""
        cfg = load_config(None, [
            f"name=bench-{scheduler}", f"data.root={self.data_root}", f"storage.store={self.store}",
            f"data.crop={self.crop}", f"train.epochs={self.epochs}", f"train.batch_size={self.batch_size}",
            f"train.max_steps_per_epoch={self.max_steps_per_epoch}", "train.num_workers=1",
            "train.cpus_per_worker=0.5", "train.test_best=false", "runtime.wandb.mode=disabled",
            "train.deterministic=true",  # a trial's epochs are the same in both sweeps: only the scheduler differs
            "train.early_stopping.metric=val/f1_deformation", "train.early_stopping.mode=max", *self.extra,
        ])
        return cfg.with_overrides({"sweep": {
            "name": f"bench-{scheduler}", "search": "grid", "scheduler": scheduler,
            "space": {"model.name": {"grid": list(self.backbones)}, "train.lr": {"grid": list(self.lrs)}},
            "seeds": list(self.seeds), "metric": "val/f1_deformation", "mode": "max",
            "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": self.concurrent,
        }})


def sweep_rep(setup: SweepSetup, scheduler: str) -> Rep:
    """Run one sweep; value = worker-seconds (a cost), extras: best F1, trials, wall seconds, failures."""
    from thalia_ray.tune.driver import run_sweep

    summary = run_sweep(setup.config(scheduler))
    if summary.status != "finished":
        raise RuntimeError(f"the {scheduler} sweep {summary.sweep_id} failed: {'; '.join(summary.errors)[:800]}")
    bests = [t["best"] for t in summary.trials if t.get("best") is not None]
    if not bests:
        raise RuntimeError(f"the {scheduler} sweep {summary.sweep_id} reported no {summary.metric}")
    epochs = sum(int(t.get("epochs", 0)) for t in summary.trials)
    return Rep(summary.worker_seconds, summary.seconds,
               {"best": max(bests), "trials": float(len(summary.trials)), "epochs_trained": float(epochs)})


def reached(asha_best: float, grid_best: float, tolerance: float = TOLERANCE) -> bool:
    """ASHA's best is within `tolerance` (relative) of the grid's best (higher is better)."""
    return asha_best >= grid_best - tolerance * abs(grid_best)


def summarise_pairs(asha: Sequence[Rep], grid: Sequence[Rep]) -> dict[str, Any]:
    """Per repetition pair: did ASHA reach the grid's best, and how far it was."""
    pairs = [{"asha_best": a.extra["best"], "grid_best": g.extra["best"],
              "reached": reached(a.extra["best"], g.extra["best"])} for a, g in zip(asha, grid)]
    return {"pairs": pairs, "all_reached": all(p["reached"] for p in pairs)}
