"""The synthetic Thalia generator: a frame's cube from its annotation records, and the public
`synthesize` entry point that writes a whole dataset (cubes + annotations + index + statistics).

Per pair: deformation (sources from the polygons, scaled by intensity and grown over the series)
+ atmosphere (per acquisition date, differenced; flagged pairs get the extra nuisance the annotator
saw) + orbital ramp + glacier fringes, converted to phase, plus coherence-consistent phase noise,
wrapped; then the data-quality defects the record flags.
"""
from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from thalia_ray.config import ConfigError
from thalia_ray.data import schema
from thalia_ray.synthetic import atmosphere, catalogue, defects, terrain
from thalia_ray.synthetic.catalogue import FramePlan, Record
from thalia_ray.synthetic.deformation import SeriesSource, pair_deformation, series_sources
from thalia_ray.synthetic.phase import los_to_phase, noise_table, wrap
from thalia_ray.synthetic.scene import AcquisitionCache, Scene, build_scene, parse_day, rng_for, turbulence
from thalia_ray.synthetic.writer import CubeWriter, DatasetMoments, write_side_files
from thalia_ray.storage import Location, local

GENERATOR_VERSION = "1.2.0"  # 1.1: sampled frames keep the real 100 m pixels; 1.2: faster wrap and ramp (≤ 2e-5 rad)
STRATIFIED_MIN_DW = 4.0  # kg m⁻²: below this a flagged pair gets an extra stratified term (≈ 1 fringe / 3 km)


@dataclass(frozen=True)
class SynthReport:
    frames: int
    pairs: int
    groups: int
    seconds: float


def _nuisance_m(scene: Scene, primary, secondary, record: Record, rng: np.random.Generator) -> np.ndarray:
    """LOS-equivalent delay of the pair: differenced per-date atmosphere plus what the flags ask for."""
    shape = scene.dem.shape
    delay = (secondary.turbulence_m - primary.turbulence_m) + (secondary.stratified_m - primary.stratified_m)
    fringes = int(record.get("atmospheric_fringes", 0))
    if fringes in (2, 3):  # turbulent: 1–2 cm
        delay += turbulence(scene, rng) * np.float32(rng.uniform(0.01, 0.02))
    change = secondary.weather.water_vapour - primary.weather.water_vapour
    if fringes in (1, 3) and abs(change) < STRATIFIED_MIN_DW:
        extra = np.sign(change or 1.0) * rng.uniform(STRATIFIED_MIN_DW, 2 * STRATIFIED_MIN_DW)
        delay += np.float32(atmosphere.WET_DELAY_PER_TCWV * extra) * scene.wet_profile / scene.cos_incidence
    ramp = rng.uniform(1.0, 3.0) if record.get("orbital_fringes") else rng.uniform(0.0, 0.1)
    delay += atmosphere.orbital_ramp(shape, scene.geometry.pixel_m, ramp, rng)
    return delay - np.float32(delay.mean())  # interferograms are referenced: absolute offset unknown


def pair_fields(scene: Scene, acquisitions: AcquisitionCache, record: Record, sources: list[SeriesSource],
                position: int) -> dict[str, np.ndarray]:
    """All per-pair variables of one interferogram, as written to the cube."""
    p_day, s_day = record["primary_date"], record["secondary_date"]
    rng = rng_for(scene.seed, "pair", parse_day(p_day).toordinal(), parse_day(s_day).toordinal())
    primary, secondary = acquisitions[p_day], acquisitions[s_day]
    shape = scene.dem.shape
    deformation, mask = pair_deformation(sources, position, shape)
    phase = los_to_phase(deformation + _nuisance_m(scene, primary, secondary, record, rng))
    baseline = (parse_day(s_day) - parse_day(p_day)).days
    gamma = scene.coherence.gamma(baseline, (primary.snow_line_m, secondary.snow_line_m),
                                  bool(record.get("low_coherence")), rng)
    if record.get("glacier_fringes"):
        glacier, ice = terrain.glacier_phase(scene.dem, rng.uniform(3.0, 10.0), rng.uniform(0.6, 0.85))
        phase += glacier
        gamma = np.where(ice, gamma * np.float32(0.3), gamma)
    noise, coherence = noise_table().sample(gamma, rng)
    phase = phase + noise
    if record.get("processing_error"):
        phase = defects.burst_steps(phase, int(record["processing_error"]), rng)
    if record.get("corrupted"):
        phase, coherence = defects.corrupt(phase, coherence, rng)
    if record.get("no_info"):
        phase, coherence = defects.missing_block(phase, coherence, rng)
    if record.get("image_artifacts"):
        phase = defects.stripes(phase, rng)
    # zeros outside the swath and no coherence where nothing scatters coherently (water, layover, shadow)
    fields = {
        "insar_difference": np.where(scene.valid, wrap(phase), np.float32(0)),
        "insar_coherence": np.where(scene.valid & (scene.coherence.geometric > 0), coherence * np.float32(255), 0
                                    ).astype(np.float32),
        schema.MASK_VAR: mask,
    }
    for prefix, acquisition in (("primary_date_", primary), ("secondary_date_", secondary)):
        fields.update({prefix + name: values for name, values in acquisition.era5.items()})
    return fields


def series_of(records: list[Record]) -> dict[str, list[Record]]:
    """Records grouped by primary date (a time series shares its primary), secondaries in order."""
    series: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        series[record["primary_date"]].append(record)
    return {p: sorted(rs, key=lambda r: r["secondary_date"]) for p, rs in sorted(series.items())}


def iter_frame(scene: Scene, records: list[Record]):
    """Yield (record, fields) for every record of a frame, one series at a time."""
    acquisitions = AcquisitionCache(scene)
    for primary, members in series_of(records).items():
        sources = series_sources(members, scene.geometry, rng_for(scene.seed, "series", parse_day(primary).toordinal()))
        for position, record in enumerate(members):
            yield record, pair_fields(scene, acquisitions, record, sources, position)


@dataclass
class FrameResult:
    frame_id: str
    pairs: int
    groups: int
    moments: DatasetMoments
    seconds: float


def generate_frame(out: str | Location, plan: FramePlan, size: int, seed: int) -> FrameResult:
    """Write `{frame_id}.zarr` for one plan; returns its counts and channel moments.

    BLAS is held to one thread: its matrices here are small, so extra threads only spin (measured:
    twice the CPU time for 5 % less wall time); parallelism comes from frames in separate processes.
    """
    with threadpool_limits(limits=1):
        return _generate_frame(out, plan, size, seed)


def _generate_frame(out: str, plan: FramePlan, size: int, seed: int) -> FrameResult:
    start = time.perf_counter()
    pairs = {(r["primary_date"], r["secondary_date"]) for r in plan.records}
    if len(pairs) != len(plan.records):
        raise ValueError(f"frame {plan.frame_id}: several annotation records share one (primary, secondary) pair")
    scene = build_scene(plan.frame_id, size, seed, plan.records, plan.pixel_m)
    attributes = {
        "frame_id": plan.frame_id,
        "pass_direction": "descending" if scene.descending else "ascending",
        "generator": "thalia_ray.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "pixel_spacing_m": scene.geometry.pixel_m,
        "Conventions": "CF-1.8",
    }
    writer = CubeWriter(local(out).join(f"{plan.frame_id}{schema.CUBE_SUFFIX}"),
                        sorted({p for p, _ in pairs}), sorted({s for _, s in pairs}), size, attributes)
    writer.write_dem(scene.dem)
    moments = DatasetMoments()
    for record, fields in iter_frame(scene, plan.records):
        writer.write_pair(record["primary_date"], record["secondary_date"], fields)
        for channel in schema.ALL_CHANNELS:
            if channel != "dem":
                moments.add(channel, fields[channel])
    moments.add_repeated("dem", scene.dem, len(plan.records))
    writer.close()
    return FrameResult(plan.frame_id, len(plan.records), len(plan.groups), moments, time.perf_counter() - start)


def _plans(frames: int, size: int, seed: int, meta_dir: str | Location | None, frame_ids: list[str] | None,
           max_groups_per_frame: int | None) -> list[FramePlan]:
    if meta_dir is not None:
        annotations, timeseries = catalogue.load_meta(meta_dir)
        return catalogue.plans_from_annotations(annotations, timeseries, frame_ids, frames, max_groups_per_frame, size)
    if frame_ids:
        raise ConfigError("--frame-ids needs --from-annotations (real annotations); sampled mode draws its own frames")
    return [catalogue.sample_plan(rng_for(seed, "plan", i), i, size, max_groups_per_frame) for i in range(frames)]


def synthesize(out: str | Location, *, frames: int = 4, size: int = 128, seed: int = 0,
               meta_dir: str | Location | None = None,
               frame_ids: list[str] | None = None, max_groups_per_frame: int | None = None, workers: int = 1,
               progress: Callable[[str], None] | None = None) -> SynthReport:
    """Write a synthetic Thalia dataset to `out` (a local path, or a Location resolved with the storage
    settings); see docs/synthetic.md.

    With `meta_dir`, the real annotation records of the chosen frames drive the imagery; without it
    the records are sampled. The same arguments always give byte-identical cubes. A bad argument is a
    ConfigError named by its `thalia-ray synth` option, which `synth` prints as it is.
    """
    for option, value, least in (("--size", size, 16), ("--frames", frames, 1), ("--workers", workers, 1)):
        if value < least:
            raise ConfigError(f"{option} {value}: must be at least {least}")
    start = time.perf_counter()
    plans = _plans(frames, size, seed, meta_dir, frame_ids, max_groups_per_frame)
    results: list[FrameResult] = []
    if workers == 1:
        for plan in plans:
            results.append(generate_frame(out, plan, size, seed))
            _report(progress, results[-1])
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(generate_frame, out, plan, size, seed) for plan in plans]
            for future in futures:
                results.append(future.result())
                _report(progress, results[-1])
    moments = DatasetMoments()
    for result in results:  # fixed order: the statistics do not depend on scheduling
        moments.merge(result.moments)
    write_side_files(
        local(out),
        {str(r["uniqueID"]): r for plan in plans for r in plan.records},
        {plan.frame_id: plan.groups for plan in plans},
        moments.statistics(),
        catalogue.frame_names(plans, meta_dir),
    )
    return SynthReport(len(plans), sum(r.pairs for r in results), sum(r.groups for r in results),
                       time.perf_counter() - start)


def _report(progress: Callable[[str], None] | None, result: FrameResult) -> None:
    if progress is not None:
        progress(f"{result.frame_id}: {result.pairs} pairs, {result.groups} groups in {result.seconds:.1f} s")
