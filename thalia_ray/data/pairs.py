"""Every interferogram a dataset's cubes hold, as series of length T with no label attached.

The time-series index lists the annotated pairs; the cubes hold every pair of a frame, labelled or
not. Pretraining learns from all of them, and `predict --pairs all` predicts on all of them, so both
plan from here: the pairs a cube holds (`existing_pairs`), grouped by primary date and cut into series
by the index's own enumeration, kept where the primary date falls in one of the allowed benchmark
periods. Nothing here reads the annotations.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from thalia_ray.data import schema
from thalia_ray.data.cube import Cube, MissingChunkError, Window, get_cache
from thalia_ray.data.index import Group, enumerated_positions, split_of
from thalia_ray.storage import Location, local

CUBE_THREADS = 8  # cubes whose pairs are listed at once


@dataclass(frozen=True)
class PairSeries:
    """T interferograms of one frame that share a primary date, as the cube holds them."""

    key: str  # "{frame}-{primary}-{secondary_secondary...}": unique, stable, no dots or slashes
    frame_id: str
    primary_date: str
    secondary_dates: tuple[str, ...]
    period: str  # the benchmark period of the primary date: train, val or test

    @property
    def group(self) -> str:
        """The (frame, primary date) group: series of one group share interferograms."""
        return f"{self.frame_id}-{self.primary_date}"


def series_key(frame_id: str, primary: str, secondaries: Sequence[str]) -> str:
    return f"{frame_id}-{primary}-{'_'.join(secondaries)}"


def frame_ids(root: str | Location) -> list[str]:
    """Frame ids of the cubes under a dataset root."""
    return sorted(n.removesuffix(schema.CUBE_SUFFIX) for n in local(root).list() if n.endswith(schema.CUBE_SUFFIX))


def existing_pairs(cube: Cube) -> dict[str, list[str]]:
    """{primary: [secondary, ...]} of the interferograms the cube holds: those with a phase value at
    the frame centre (the grid is sparse: an absent pair's chunk was never written, or reads NaN)."""
    height, width = cube.shape
    centre = Window(height // 2, width // 2, 1, 1)
    secondaries = sorted(cube.secondary_index, key=cube.secondary_index.__getitem__)
    pairs = {}
    for primary, p in sorted(cube.primary_index.items()):
        present = [s for s in secondaries if _has_phase(cube, p, cube.secondary_index[s], centre)]
        if present:
            pairs[primary] = present
    return pairs


def _has_phase(cube: Cube, primary: int, secondary: int, centre: Window) -> bool:
    try:
        return bool(np.isfinite(cube.read("insar_difference", primary, [secondary], centre)[0, 0, 0]))
    except MissingChunkError:
        return False


def cube_series(root: str | Location, frames: Sequence[str], length: int, periods: Mapping[str, Any],
                seed: int) -> list[PairSeries]:
    """Every series of `length` over the pairs the cubes of `frames` hold whose primary date lies in one
    of `periods` ({name: range with start/end}), by the index's enumeration of a training group."""
    cache = get_cache(root)
    with ThreadPoolExecutor(min(CUBE_THREADS, max(len(frames), 1))) as pool:  # object-store latency dominates
        held = list(pool.map(lambda frame: existing_pairs(cache.get(frame)), frames))
    series = []
    for frame, pairs in zip(frames, held):
        for primary, secondaries in pairs.items():
            period = split_of(primary, dict(periods))
            if period is None:
                continue
            n = len(secondaries)
            group = Group(frame, primary, tuple(secondaries), tuple(range(n)), (False,) * n, "train")
            for positions in enumerated_positions(group, length, seed):
                chosen = tuple(secondaries[p] for p in positions)
                series.append(PairSeries(series_key(frame, primary, chosen), frame, primary, chosen, period))
    return series
