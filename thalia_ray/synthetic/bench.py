"""Generator speed: time series per second per core at 512², as in docs/synthetic.md §6.

Measured in process CPU time (not wall time), so that the figure is per core and holds on a busy
machine; writing is excluded (it depends on the storage, not on the physics).
"""
from __future__ import annotations

import time
from datetime import date, timedelta

from threadpoolctl import threadpool_limits

from thalia_ray.synthetic.generator import iter_frame
from thalia_ray.synthetic.phase import noise_table
from thalia_ray.synthetic.scene import build_scene

BENCH_FRAME = "128D_09016_110500"


def _series_records(index: int, length: int, size: int) -> list[dict]:
    """A positive series with two sources (a sill and a dyke), turbulent and stratified fringes."""
    primary = date(2018, 1, 1) + timedelta(days=6 * length * index)
    scale = size / 1000
    sill = [v * scale for v in (400, 400, 470, 400, 470, 460, 400, 460)]
    dyke = [v * scale for v in (600, 500, 610, 500, 610, 580, 600, 580)]
    return [{
        "uniqueID": index * 100 + k, "primary_date": primary.strftime("%Y%m%d"),
        "secondary_date": (primary + timedelta(days=6 * (k + 1))).strftime("%Y%m%d"),
        "label": ["Deformation"], "activity_type": ["Sill", "Dyke"], "intensity_level": ["High", "Medium"],
        "segmentation_mask": [sill, dyke], "atmospheric_fringes": 3, "low_coherence": 0,
    } for k in range(length)]


def series_per_second(size: int = 512, length: int = 3, repeats: int = 10) -> dict:
    """Generate `repeats` series of `length` pairs on one frame; report series/s per core."""
    records = [r for i in range(repeats) for r in _series_records(i, length, size)]
    scene = build_scene(BENCH_FRAME, size, 0, records)
    noise_table()  # built once per process, not per series
    with threadpool_limits(limits=1):  # as `generate_frame` runs: one core, no spinning BLAS threads
        cpu, wall = time.process_time(), time.perf_counter()
        pairs = sum(1 for _ in iter_frame(scene, records))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "size": size, "length": length, "series": repeats, "pairs": pairs,
        "cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3),
        "ms_per_series": round(1000 * cpu / repeats, 1), "series_per_second_per_core": round(repeats / cpu, 2),
    }


if __name__ == "__main__":
    print(series_per_second())
