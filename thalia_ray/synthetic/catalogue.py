"""Which frames, pairs and labels to synthesise: real annotation records (from-annotations mode)
or records drawn to match the real distributions (sampled mode).

The sampled-mode numbers below were measured once, at development time, from the real Thalia
metadata (annotations.json.gz and quality_timeseries.json in the team's shared thalia_meta folder:
19,919 records, 38 frames, 5,498 groups); sampled mode never reads that folder.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np

from thalia_ray.config import ConfigError
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationError
from thalia_ray.data.index import split_of
from thalia_ray.synthetic.scene import PUBLISHED_PIXEL_M
from thalia_ray.storage import Location, local

Record = dict[str, Any]
# {primary_date: {"length": n, "secondary_date": [...], "uniqueID": [...]}} for one frame
GroupIndex = dict[str, dict[str, Any]]

# ---- measured from the real metadata (see module docstring) -------------------------------------
DESCENDING_SHARE = 25 / 38  # 25 of 38 frames are descending
GROUPS_PER_FRAME = (15, 320)  # min and max groups per frame (median 130)
GROUP_LENGTHS = {1: 277, 2: 697, 3: 1800, 4: 2353, 5: 123, 6: 116, 7: 52, 8: 35, 9: 21, 10: 10, 11: 5, 12: 3}
FIRST_BASELINE_DAYS = {6: 2624, 12: 2198, 24: 439, 36: 65, 48: 59, 18: 51}  # primary → 1st secondary
NEXT_GAP_DAYS = {6: 2680, 12: 2146, 24: 384, 36: 61, 48: 55, 18: 48}  # between consecutive acquisitions
RECORDS_PER_YEAR = {2014: 114, 2015: 718, 2016: 1579, 2017: 2651, 2018: 3572, 2019: 4437, 2020: 5055, 2021: 1793}
POSITIVE_GROUP_SHARE_ACTIVE = 0.126 * 38 / 23  # 12.6 % of groups hold a positive; 23 of 38 frames do
POSITIVE_MEMBER_SHARE = 0.69  # share of positive members inside a positive group
SOURCES_PER_POSITIVE = {1: 1496, 2: 235, 3: 65, 4: 23}
ACTIVITY_TYPES = {"Sill": 1264, "Dyke": 527, "Mogi": 333, "Earthquake": 55, "Unidentified": 51, "Spheroid": 25}
INTENSITIES = {"Low": 909, "High": 754, "Medium": 536}  # earthquakes carry "None"
POLYGON_EXTENT_PX = (23.0, 0.85)  # lognormal (median, σ_log) of a polygon's major extent, 100 m pixels
POLYGON_EXTENT_RANGE_PX = (10.0, 250.0)
SITE_MARGIN = 0.3  # of a sampled frame's side: sites lie in the central 40 %, polygons span ≤ 60 % of it
ATMOSPHERIC_FRINGES = {0: 1473, 1: 3191, 2: 11233, 3: 4022}
FLAG_RATES = {"glacier_fringes": 80 / 19919, "orbital_fringes": 145 / 19919, "image_artifacts": 58 / 19919}
NEGATIVE_ONLY_RATES = {"corrupted": 312 / 18100, "no_info": 220 / 18100}
PROCESSING_ERROR = {0: 19423, 3: 324, 2: 172}
LOW_COHERENCE_SHARE = 0.173  # median baseline 36 d when flagged vs 24 d overall
CONFIDENCE = {0.8: 19454, 0.7: 203, 0.6: 196, 0.5: 66}
REBOUND_SHARE = 134 / 1804
MISSION_START, MISSION_END, SIX_DAY_START = date(2014, 10, 3), date(2021, 11, 30), date(2016, 10, 1)


# ---- real metadata --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FramePlan:
    """Everything the generator needs for one frame: its records and its time-series index."""

    frame_id: str
    records: list[Record]
    groups: GroupIndex
    index: int = 0  # position in the dataset (sampled mode: makes unique ids)
    pixel_m: float | None = None  # None: the frame spans the published extent; sampled: the real 100 m


def load_meta(meta_dir: str | Location) -> tuple[dict[str, Record], dict[str, GroupIndex]]:
    """annotations.json[.gz] and quality_timeseries.json from a local path or URL."""
    root = local(meta_dir)
    for name in (schema.ANNOTATIONS_FILE, schema.ANNOTATIONS_FILE + ".gz"):
        if root.join(name).exists():
            annotations = root.join(name).read_json()
            break
    else:
        raise AnnotationError(f"--from-annotations {root}: no {schema.ANNOTATIONS_FILE} or "
                              f"{schema.ANNOTATIONS_FILE}.gz there")
    timeseries = root.join(schema.TIMESERIES_FILE)
    if not timeseries.exists():
        raise AnnotationError(f"--from-annotations {root}: no {schema.TIMESERIES_FILE} there")
    return annotations, timeseries.read_json()


def benchmark_split(day: str) -> str:
    """The benchmark split of a primary date `YYYYMMDD` (the published periods, `schema.SPLITS`)."""
    split = split_of(day, schema.SPLITS)
    if split is None:
        raise ValueError(f"primary date {day} lies outside every split {schema.SPLITS}")
    return split


def _is_positive(record: Record) -> bool:
    return list(record["label"]) != [schema.NEGATIVE_LABEL]


def select_groups(groups: GroupIndex, annotations: dict[str, Record], limit: int) -> GroupIndex:
    """`limit` groups covering every split, groups with a positive first, returned in date order.

    Splits are visited round-robin so that a small subset still trains, validates and tests.
    """
    per_split: dict[str, list[str]] = defaultdict(list)
    for primary in sorted(groups):
        per_split[benchmark_split(primary)].append(primary)
    for name, primaries in per_split.items():
        primaries.sort(key=lambda p: not any(_is_positive(annotations[str(u)]) for u in groups[p]["uniqueID"]))
    chosen: list[str] = []
    queues = [per_split[name] for name in schema.SPLITS if per_split.get(name)]
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return {p: groups[p] for p in sorted(chosen)}


def rescale_polygon(polygon: list[float], size: int) -> list[float]:
    """Flat x, y polygon from the published ~1000-px frame to a `size`-px frame."""
    factor = size / schema.PUBLISHED_FRAME_SIZE
    return [float(v) * factor for v in polygon]


def rescale_polygons(record: Record, size: int) -> Record:
    """A copy of `record` whose polygons are scaled from the published ~1000-px frame to `size` px."""
    polygons = [rescale_polygon(polygon, size) for polygon in record.get("segmentation_mask") or []]
    return {**record, "segmentation_mask": polygons}


def frame_names(plans: list[FramePlan], meta_dir: str | Location | None) -> dict[str, str]:
    """frame id → volcano names: the real ones when `meta_dir` has a frame_names.json, else one
    made-up name per frame (a sampled frame is one synthetic volcano field)."""
    real = local(meta_dir).join(schema.FRAME_NAMES_FILE) if meta_dir is not None else None
    known = real.read_json() if real is not None and real.exists() else {}
    return {p.frame_id: known.get(p.frame_id, f"Synthetic volcano {p.index:03d}") for p in plans}


def plans_from_annotations(
    annotations: dict[str, Record],
    timeseries: dict[str, GroupIndex],
    frame_ids: list[str] | None,
    frames: int,
    max_groups_per_frame: int | None,
    size: int,
) -> list[FramePlan]:
    """One plan per requested real frame: its records (polygons rescaled) and its groups."""
    by_frame: dict[str, list[Record]] = defaultdict(list)
    for record in annotations.values():
        by_frame[record["frameID"]].append(record)
    known = sorted(by_frame)
    wanted = list(frame_ids) if frame_ids else known[:frames]
    missing = [f for f in wanted if f not in by_frame]
    if missing:
        raise ConfigError(f"--frame-ids: frame(s) {missing} not in the annotations; known frames: {known}")
    plans = []
    for index, frame in enumerate(wanted):
        groups = timeseries.get(frame, {})
        records = by_frame[frame]
        if max_groups_per_frame is not None:
            groups = select_groups(groups, annotations, max_groups_per_frame)
            keep = {str(u) for g in groups.values() for u in g["uniqueID"]}
            records = [r for r in records if str(r["uniqueID"]) in keep]
        records = sorted((rescale_polygons(r, size) for r in records), key=lambda r: int(r["uniqueID"]))
        plans.append(FramePlan(frame, records, groups, index))
    return plans


# ---- sampled mode -----------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, weights: dict[Any, float]) -> Any:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _day(when: date) -> str:
    return when.strftime("%Y%m%d")


def _acquisitions(rng: np.random.Generator) -> list[date]:
    """Acquisition dates of one frame: every 12 days, every 6 once Sentinel-1B flies (late 2016)."""
    day, days = MISSION_START + timedelta(days=int(rng.integers(0, 12))), []
    while day <= MISSION_END:
        days.append(day)
        day += timedelta(days=6 if day >= SIX_DAY_START else 12)
    return days


def _primaries(rng: np.random.Generator, acquisitions: list[date], count: int) -> list[date]:
    """`count` distinct primary dates, weighted by the real records per year, ≥ 2 per split."""
    year_weight = {y: w / len([a for a in acquisitions if a.year == y]) for y, w in RECORDS_PER_YEAR.items()}
    p = np.asarray([year_weight.get(a.year, 0.0) for a in acquisitions])
    chosen: set[date] = set()
    for start, end in schema.SPLITS.values():
        inside = [i for i, a in enumerate(acquisitions[:-1]) if start <= a <= end]
        chosen.update(acquisitions[i] for i in rng.choice(inside, size=min(2, len(inside)), replace=False))
    candidates = np.asarray(range(len(acquisitions) - 1))
    weights = p[:-1] / p[:-1].sum()
    while len(chosen) < count:
        chosen.add(acquisitions[int(rng.choice(candidates, p=weights))])
    return sorted(chosen)


def _secondaries(rng: np.random.Generator, primary: date, length: int) -> list[date]:
    day = primary + timedelta(days=int(_pick(rng, FIRST_BASELINE_DAYS)))
    out = [day]
    while len(out) < length:
        day += timedelta(days=int(_pick(rng, NEXT_GAP_DAYS)))
        out.append(day)
    return out


def max_polygon_extent(size: int) -> float:
    """Largest major extent (px) of a sampled polygon in a `size`-px frame: it must fit inside."""
    low, high = POLYGON_EXTENT_RANGE_PX
    return float(min(high, max(low, SITE_MARGIN * 2 * size)))


def sample_polygon(rng: np.random.Generator, centre: tuple[float, float], size: int) -> list[float]:
    """A jittered ellipse (16 vertices, flat x, y list) sized like the real polygons in real 100 m
    pixels (the larger ones capped to fit a small frame), vertices clipped to the `size`-px frame."""
    median, sigma = POLYGON_EXTENT_PX
    major = float(np.clip(median * np.exp(sigma * rng.standard_normal()),
                          POLYGON_EXTENT_RANGE_PX[0], max_polygon_extent(size))) / 2
    minor = major * rng.uniform(0.5, 1.0)
    angle, t = rng.uniform(0, np.pi), np.linspace(0, 2 * np.pi, 16, endpoint=False)
    radius = 1 + 0.1 * rng.standard_normal(16)
    ex, ey = major * np.cos(t) * radius, minor * np.sin(t) * radius
    xs = np.clip(centre[0] + ex * np.cos(angle) - ey * np.sin(angle), 0.0, size - 1.0)
    ys = np.clip(centre[1] + ex * np.sin(angle) + ey * np.cos(angle), 0.0, size - 1.0)
    return [round(float(v), 3) for xy in zip(xs, ys) for v in xy]


def _caption(record: Record) -> str:
    parts = []
    if record["atmospheric_fringes"] in (1, 3):
        parts.append("Vertical stratification caused by atmospheric delays can be detected.")
    if record["atmospheric_fringes"] in (2, 3):
        parts.append("Turbulent mixing effect can be detected on the wider area.")
    if _is_positive(record):
        for kind, level in zip(record["activity_type"], record["intensity_level"]):
            parts.append(f"A {kind.lower()}-type deformation pattern of {level.lower()} intensity is detected.")
    else:
        parts.append("No deformation activity can be detected.")
    return " ".join(parts)


def _record(rng: np.random.Generator, frame_id: str, primary: date, secondary: date,
            sources: list[tuple[str, str, list[float]]] | None) -> Record:
    """One annotation record with flags drawn from the real marginals (positives carry `sources`)."""
    positive = bool(sources)
    kinds = [k for k, _, _ in sources or []]
    if positive:
        label = ["Earthquake"] if set(kinds) == {"Earthquake"} else (
            ["Deformation", "Earthquake"] if "Earthquake" in kinds else ["Deformation"])
        phase = "None" if label == ["Earthquake"] else ("Rebound" if rng.random() < REBOUND_SHARE else "Unrest")
    else:
        label, phase = [schema.NEGATIVE_LABEL], "Rest"
    baseline = (secondary - primary).days
    low_coherence = rng.random() < min(0.9, LOW_COHERENCE_SHARE * baseline / 24.0)
    record: Record = {
        "uniqueID": 0,
        "frameID": frame_id,
        "primary_date": _day(primary),
        "secondary_date": _day(secondary),
        "corrupted": int(not positive and rng.random() < NEGATIVE_ONLY_RATES["corrupted"]),
        "processing_error": int(_pick(rng, PROCESSING_ERROR)),
        "glacier_fringes": int(rng.random() < FLAG_RATES["glacier_fringes"]),
        "orbital_fringes": int(rng.random() < FLAG_RATES["orbital_fringes"]),
        "atmospheric_fringes": int(_pick(rng, ATMOSPHERIC_FRINGES)),
        "low_coherence": int(low_coherence),
        "no_info": int(not positive and rng.random() < NEGATIVE_ONLY_RATES["no_info"]),
        "image_artifacts": int(rng.random() < FLAG_RATES["image_artifacts"]),
        "label": label,
        "activity_type": kinds,
        "intensity_level": [lvl for _, lvl, _ in sources or []],
        "phase": phase,
        "confidence": float(_pick(rng, CONFIDENCE)),
        "segmentation_mask": [poly for _, _, poly in sources or []],
        "is_crowd": int(len(kinds) > 1),
        "caption": "",
    }
    record["caption"] = _caption(record)
    return record


def _frame_id(rng: np.random.Generator, index: int) -> str:
    orbit = int(rng.integers(1, 176))
    direction = "D" if rng.random() < DESCENDING_SHARE else "A"
    return f"{orbit:03d}{direction}_{index:05d}_{int(rng.integers(0, 1_000_000)):06d}"


def sample_plan(rng: np.random.Generator, index: int, size: int, max_groups: int | None) -> FramePlan:
    """A synthetic frame: dates, groups, labels, flags and polygons drawn like the real ones.

    The frame keeps the real 100 m pixels (it is a `size`·100 m window of a real-like frame), so
    deformation footprints span as many pixels as on the real data whatever `size` is.
    Every sampled frame is volcanically active and gets at least one positive group per split, so
    that small generated sets can train, validate and test (15 of the 38 real frames have none).
    """
    frame_id = _frame_id(rng, index)
    n_groups = int(rng.integers(*GROUPS_PER_FRAME))
    if max_groups is not None:
        n_groups = min(n_groups, max_groups)
    acquisitions = _acquisitions(rng)
    primaries = _primaries(rng, acquisitions, max(n_groups, 2 * len(schema.SPLITS)))
    low, high = SITE_MARGIN * size, (1 - SITE_MARGIN) * size
    sites = [(rng.uniform(low, high), rng.uniform(low, high)) for _ in range(int(rng.integers(1, 4)))]
    site_kind = [_pick(rng, ACTIVITY_TYPES) for _ in sites]
    positive_groups = {p for p in primaries if rng.random() < POSITIVE_GROUP_SHARE_ACTIVE}
    for start, end in schema.SPLITS.values():
        inside = [p for p in primaries if start <= p <= end]
        if inside and not positive_groups.intersection(inside):
            positive_groups.add(inside[int(rng.integers(len(inside)))])
    records: list[Record] = []
    groups: GroupIndex = {}
    for primary in primaries:
        secondaries = _secondaries(rng, primary, int(_pick(rng, GROUP_LENGTHS)))
        group_sources = None
        if primary in positive_groups:
            n_sources = min(int(_pick(rng, SOURCES_PER_POSITIVE)), len(sites))
            picked = rng.choice(len(sites), size=n_sources, replace=False)
            group_sources = [
                (site_kind[i], "None" if site_kind[i] == "Earthquake" else _pick(rng, INTENSITIES), sites[i])
                for i in picked
            ]
        positives = {int(rng.integers(len(secondaries)))} | {
            k for k in range(len(secondaries)) if rng.random() < POSITIVE_MEMBER_SHARE
        } if group_sources else set()
        ids = []
        for k, secondary in enumerate(secondaries):
            sources = [(kind, level, sample_polygon(rng, site, size))
                       for kind, level, site in group_sources] if k in positives and group_sources else None
            record = _record(rng, frame_id, primary, secondary, sources)
            record["uniqueID"] = index * 1_000_000 + len(records) + 1
            records.append(record)
            ids.append(record["uniqueID"])
        groups[_day(primary)] = {"length": len(ids), "secondary_date": [_day(s) for s in secondaries], "uniqueID": ids}
    return FramePlan(frame_id, records, groups, index, PUBLISHED_PIXEL_M)


