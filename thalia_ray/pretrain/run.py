"""`thalia-ray pretrain`: the checks before Ray starts, then an ordinary run of the shared trainer with
the pretraining objective (so it is checkpointed, resumed, tracked and recorded like any run, as a run
of kind `pretrain`)."""
from __future__ import annotations

from thalia_ray import preflight
from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.cube_checks import crop_fits, cube_shapes
from thalia_ray.data.locations import DataLocations, location_present
from thalia_ray.data.transforms import load_statistics
from thalia_ray.errors import DataProblem
from thalia_ray.ids import check_id
from thalia_ray.pretrain.objective import Pretraining
from thalia_ray.pretrain.source import HOLDOUT, TRAIN
from thalia_ray.storage import S3Options
from thalia_ray.store.layout import ExperimentStore
from thalia_ray.store.records import Lease
from thalia_ray.train.trainer import TrainResult, fit, steps_per_epoch


def check(cfg: ThaliaConfig, run_id: str | None = None) -> Pretraining:
    """Everything a pretraining run needs, checked without Ray; returns the prepared objective.

    The data root, the cubes' variables (channels and pretext targets) and their size against the crop,
    the series each split gets (enough for a batch per worker), the normalisation statistics of every
    variable read, the network (backbone, method, crop), and a writable store."""
    if run_id is not None:
        check_id(run_id)
    if cfg.data.source != "cube":
        raise ConfigError(f"data.source {cfg.data.source!r}: pretraining reads every pair from the cubes under "
                          "data.root (shards hold only the time-series index's series); set data.source=cube")
    location_present(cfg.data.root, "data.root", S3Options.of(cfg.storage))
    preflight.statistics_usable(cfg)
    objective = Pretraining().prepare(cfg)
    source = objective.source
    assert source is not None
    probes = list({s.frame_id: s for s in [*source.pools[HOLDOUT], *source.pools[TRAIN]]}.values())  # a series per frame
    crop_fits(cfg.data.crop, cube_shapes(cfg, probes, [*source.channels, *source.targets]))
    sizes = {TRAIN: len(source.pools[TRAIN]), HOLDOUT: len(source.pools[HOLDOUT])}
    if not sizes[TRAIN]:
        raise DataProblem(f"data.root {cfg.data.root}: the cubes hold no pair with a primary date in "
                          f"pretrain.splits {cfg.pretrain.splits}")
    steps_per_epoch(cfg, sizes)
    if cfg.data.normalize and source.targets:
        stats = load_statistics(DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics)
        missing = sorted({schema.statistics_key(v) for v in source.targets} - set(stats))
        if missing:
            raise ConfigError(f"pretrain.heads: the statistics have no entry for {missing}, read as pretext targets")
    preflight.writable(cfg.storage.store, "storage.store", S3Options.of(cfg.storage))
    return objective


def pretrain(cfg: ThaliaConfig, *, store: ExperimentStore | None = None, run_id: str | None = None,
             lease: Lease | None = None, objective: Pretraining | None = None) -> TrainResult:
    """Pretrain on the connected Ray cluster; see `train.trainer.fit` for `store`, `run_id` and `lease`."""
    return fit(cfg, store=store, run_id=run_id, lease=lease, objective=objective or Pretraining())
