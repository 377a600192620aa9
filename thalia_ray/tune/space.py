"""Sweep configuration → Ray Tune search space, search algorithm and scheduler.

Search dimensions are keyed by dotted config paths (`train.lr`, `model.name`); a trial's sampled values are
applied to the base run configuration with `ThaliaConfig.with_overrides`, so every trial is an ordinary,
fully validated run configuration. Repeated seeds are one more grid dimension (`seed`).
"""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from thalia_ray.config import Dimension, SweepConfig, ThaliaConfig

# Tune reports the epoch as a metric; ASHA uses it as its time attribute because Tune's own
# `training_iteration` restarts after a resume.
TIME_ATTR = "epoch"


def _dimension(dim: Dimension, search: str) -> Any:
    """One dimension as a Tune domain. Optuna cannot take grid_search, so grids become choices there."""
    if dim.grid is not None:
        return tune.choice(dim.grid) if search == "optuna" else tune.grid_search(dim.grid)
    if dim.choice is not None:
        return tune.choice(dim.choice)
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    assert dim.randint is not None
    low, high = dim.randint
    return tune.randint(low, high + 1)  # inclusive upper bound, as written in the sweep file


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Flat `{dotted.path: domain}`; seeds are a grid (or a choice under Optuna)."""
    space = {path: _dimension(dim, sweep.search) for path, dim in sweep.space.items()}
    if len(sweep.seeds) > 1:
        space["seed"] = _dimension(Dimension(grid=list(sweep.seeds)), sweep.search)
    else:
        space["seed"] = sweep.seeds[0]
    return space


def search_algorithm(sweep: SweepConfig) -> Any | None:
    if sweep.search != "optuna":
        return None  # Tune's BasicVariantGenerator: grid × num_samples random draws
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seeds[0])


def scheduler(sweep: SweepConfig, max_epochs: int) -> TrialScheduler:
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    # max_t one past the last epoch: ASHA stops any trial that reaches max_t, and a trial reaching its
    # final epoch must be left to finish (test its best checkpoint, write its results).
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=sweep.metric,
        mode=sweep.mode,
        max_t=max_epochs + 1,
        grace_period=min(sweep.grace_period, max_epochs),
        reduction_factor=sweep.reduction_factor,
    )


def trial_config(base: ThaliaConfig, sampled: dict[str, Any]) -> ThaliaConfig:
    """The run configuration of one trial: the base with the sampled values applied (no sweep section)."""
    values = {k: v for k, v in sampled.items() if not k.startswith("_")}
    return base.model_copy(update={"sweep": None}).with_overrides(values)


def varied_fields(sweep: SweepConfig) -> list[str]:
    """The config paths that differ between trials (for summaries and leaderboards)."""
    return list(sweep.space) + (["seed"] if len(sweep.seeds) > 1 else [])
