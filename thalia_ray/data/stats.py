"""Normalisation statistics of a split, computed in parallel and merged exactly.

Each Ray task reduces the interferograms of one frame to per-variable partial moments (count,
mean, M2); partials merge with the parallel formula of Chan et al., which stays accurate where a
naive sum of squares loses every digit (surface pressure ~9e4 Pa, vertical integral ~2.4e6).
The result is written as statistics.json in the published layout: `{variable: {mean, std}}`,
ERA5 primary and secondary channels pooled under one variable.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import CubeCache, get_cache
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.samples import Window
from thalia_ray.storage import Location, local

VARIABLES: tuple[str, ...] = schema.GEOMORPHOLOGY + schema.ATMOSPHERIC


@dataclass(frozen=True)
class Moments:
    """Streaming moments of one variable: count, mean and M2 (sum of squared deviations)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        finite = np.asarray(values, dtype=np.float64).ravel()
        finite = finite[np.isfinite(finite)]
        if not finite.size:
            return cls()
        mean = float(finite.mean())
        return cls(int(finite.size), mean, float(np.square(finite - mean).sum()))

    def merge(self, other: "Moments") -> "Moments":
        if not other.count:
            return self
        if not self.count:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / count
        return Moments(count, mean, m2)

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else float("nan")


Partials = dict[str, Moments]


def merge_partials(partials: Iterable[Partials]) -> Partials:
    merged: Partials = defaultdict(Moments)
    for part in partials:
        for name, moments in part.items():
            merged[name] = merged[name].merge(moments)
    return dict(merged)


def frame_moments(cache: CubeCache, frame_id: str, pairs: dict[str, Sequence[str]]) -> Partials:
    """Moments of every variable over whole-frame interferograms `{primary: [secondaries]}` of one frame.

    Static variables (dem) count once per interferogram, as the model sees them."""
    cube = cache.get(frame_id)
    height, width = cube.shape
    window = Window(0, 0, height, width)
    channels = [c for c in schema.ALL_CHANNELS if c in cube.dataset]
    partial: Partials = defaultdict(Moments)
    for primary, secondaries in sorted(pairs.items()):
        p, s = cube.positions(primary, secondaries)
        for channel in channels:
            key = schema.statistics_key(channel)
            partial[key] = partial[key].merge(Moments.of(cube.read(channel, p, s, window)))
    return dict(partial)


def _frame_task(root: Location, frame_id: str, pairs: dict[str, list[str]]) -> Partials:
    return frame_moments(get_cache(root), frame_id, pairs)


def split_pairs(index: SampleIndex, split: str) -> dict[str, dict[str, list[str]]]:
    """The distinct interferograms of a split: `{frame: {primary: [secondaries]}}`."""
    pairs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for sample in index.samples(split):
        pairs[sample.frame_id][sample.primary_date].update(sample.secondary_dates)
    return {f: {p: sorted(s) for p, s in groups.items()} for f, groups in sorted(pairs.items())}


def to_statistics(partials: Partials) -> dict[str, dict[str, float]]:
    """Published layout, in the benchmark's variable order; variables never seen are left out."""
    return {
        name: {"mean": partials[name].mean, "std": partials[name].std}
        for name in VARIABLES if name in partials and partials[name].count
    }


def compute_statistics(data_cfg: DataConfig, locations: DataLocations, split: str = "train",
                       out: str | Location | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """Statistics of `split`, one Ray task per frame when Ray is initialised (in-process otherwise),
    written to `out` (default: `data.statistics`, else `{root}/statistics.json`). `locations` are the
    config's, resolved with its storage settings."""
    import ray

    from thalia_ray.progress import gather

    root = locations.root
    index = SampleIndex.from_config(data_cfg, seed, location=root)
    work = split_pairs(index, split)
    if not work:
        raise ValueError(f"split {split!r} has no samples under {data_cfg.root}; cannot compute statistics")
    if ray.is_initialized():
        task = ray.remote(num_cpus=1)(_frame_task)
        partials: list[Partials] = gather([task.remote(root, frame, pairs) for frame, pairs in work.items()],
                                          "statistics", unit="frame")
    else:
        partials = [_frame_task(root, frame, pairs) for frame, pairs in work.items()]
    statistics = to_statistics(merge_partials(partials))
    target = local(out) if out is not None else locations.statistics
    target.write_json(statistics, indent=4)
    return statistics
