"""From annotation polygons and intensities to LOS deformation and masks over a time series.

Each distinct source of a series (same activity type, overlapping polygons) is placed and sized
from its polygon, computed once as a unit LOS field, and scaled per pair so that its LOS range
inside the frame is the number of fringes its intensity asks for; within one intensity band the
amplitude grows with the secondary date (cumulative deformation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thalia_ray.data import schema
from thalia_ray.synthetic.fields import upsample
from thalia_ray.synthetic.phase import FRINGE_M, line_of_sight
from thalia_ray.synthetic.source_models import DeformationSource, displacement

# Fringes of LOS range per intensity (docs §4); earthquakes are annotated "None" → medium.
INTENSITY_FRINGES = {"Low": (0.5, 1.5), "Medium": (1.5, 3.0), "High": (3.0, 5.0), "None": (1.5, 3.0)}
MASK_FRACTION = 0.25  # deformation_mask: |d_LOS| above a quarter of a fringe (≥ 1 px for every positive)
OKADA_GRID = 128  # dislocations: ≤ 128² samples over their window, upsampled (smooth at that scale)
WINDOW_REACH = 6.0  # sources are evaluated within this many source sizes (depth, length, width)
SOURCE_KINDS = {"Unidentified": "Mogi"}  # no model named: the simplest volcanic source


@dataclass(frozen=True)
class Geometry:
    """Frame geometry: pixel size and the ENU coordinates of pixel centres (metres, 1-D)."""

    size: int
    pixel_m: float
    los: tuple[np.ndarray, np.ndarray, np.ndarray]

    def to_metres(self, col: float, row: float) -> tuple[float, float]:
        centre = (self.size - 1) / 2
        return (col - centre) * self.pixel_m, -(row - centre) * self.pixel_m


@dataclass(frozen=True)
class Ellipse:
    """Centre (px), semi-axes (m) and azimuth of the major axis of an annotation polygon."""

    col: float
    row: float
    major_m: float
    minor_m: float
    azimuth_deg: float


def polygon_ellipse(polygon: list[float], pixel_m: float) -> Ellipse:
    """Area-preserving ellipse of a flat (x, y, x, y, ...) polygon from its vertex covariance."""
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 3:
        raise ValueError(f"segmentation polygon needs ≥ 3 vertices, got {len(xy)}: {polygon}")
    x, y = xy[:, 0], xy[:, 1]
    area = max(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))), 0.25)
    evals, evecs = np.linalg.eigh(np.cov(xy.T) + 1e-9 * np.eye(2))
    a, b = np.sqrt(np.maximum(evals[::-1], 1e-9))
    k = np.sqrt(area / (np.pi * a * b))
    dx, dy = evecs[:, 1]
    azimuth = float(np.degrees(np.arctan2(dx, -dy)) % 180.0)  # image rows point south
    return Ellipse(float(x.mean()), float(y.mean()), max(k * a, 0.5) * pixel_m, max(k * b, 0.5) * pixel_m, azimuth)


def size_source(kind: str, ellipse: Ellipse, geometry: Geometry, fringes: float, rng: np.random.Generator) -> DeformationSource:
    """A unit-amplitude source of `kind` whose deforming footprint roughly fills the polygon."""
    east, north = geometry.to_metres(ellipse.col, ellipse.row)
    a, b = ellipse.major_m, ellipse.minor_m
    kind = SOURCE_KINDS.get(kind, kind)
    if kind in ("Mogi", "Spheroid"):
        # Mogi: |u_z| ≥ f·peak within r = d·√((N/f)^(2/3) − 1); choose d so that r is the polygon radius.
        ratio = max(fringes / MASK_FRACTION, 2.0)
        depth = max(np.sqrt(a * b) / np.sqrt(ratio ** (2 / 3) - 1), 200.0)
        return DeformationSource(kind, east, north, depth)
    if kind == "Sill":
        depth = max(0.5 * b, 250.0)
        return DeformationSource(kind, east, north, depth, length=max(2 * a - depth, a), width=max(2 * b - depth, b),
                      strike_deg=ellipse.azimuth_deg, dip_deg=rng.uniform(0.0, 5.0))
    if kind == "Dyke":
        dip, top, height = rng.uniform(75.0, 90.0), rng.uniform(0.1, 0.5) * b + 50.0, rng.uniform(1.0, 2.0) * b + 200.0
        return DeformationSource(kind, east, north, top + 0.5 * height * np.sin(np.radians(dip)), length=max(1.6 * a, 200.0),
                      width=height, strike_deg=ellipse.azimuth_deg, dip_deg=dip)
    if kind == "Earthquake":
        dip, length = rng.uniform(30.0, 80.0), max(1.4 * a, 300.0)
        rake = float(rng.choice([0.0, 90.0, -90.0, 180.0]) + rng.normal(0.0, 15.0))
        depth = 0.25 * length * np.sin(np.radians(dip)) + rng.uniform(0.2, 0.6) * b + 100.0
        return DeformationSource(kind, east, north, depth, length=length, width=0.5 * length, strike_deg=ellipse.azimuth_deg,
                      dip_deg=dip, rake_deg=rake)
    raise ValueError(f"activity type {kind!r} has no source model; known: {schema.ACTIVITY_TYPES}")


def _window(source: DeformationSource, geometry: Geometry) -> tuple[slice, slice]:
    """Pixels within WINDOW_REACH source sizes of the source: beyond, |u| < ~1 % of the peak."""
    reach = WINDOW_REACH * max(source.depth, source.length, source.width) / geometry.pixel_m
    centre = (geometry.size - 1) / 2
    col, row = centre + source.east / geometry.pixel_m, centre - source.north / geometry.pixel_m
    bounds = [int(np.clip(v, 0, geometry.size)) for v in (row - reach, row + reach + 1, col - reach, col + reach + 1)]
    return slice(bounds[0], max(bounds[1], bounds[0] + 2)), slice(bounds[2], max(bounds[3], bounds[2] + 2))


def unit_los(source: DeformationSource, geometry: Geometry) -> np.ndarray:
    """LOS displacement of `source` normalised to a range (max − min) of 1 over the frame.

    Evaluated only in a window around the source; dislocations on at most OKADA_GRID samples per
    side of that window, bilinearly upsampled (their fields are smooth at the pixel scale).
    """
    rows, cols = _window(source, geometry)
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    limit = max(shape) if source.kind in ("Mogi", "Spheroid") else OKADA_GRID
    samples = (min(shape[0], limit), min(shape[1], limit))
    centre = (geometry.size - 1) / 2
    east = (np.linspace(cols.start, cols.stop - 1, samples[1]) - centre)[None, :] * geometry.pixel_m
    north = -(np.linspace(rows.start, rows.stop - 1, samples[0]) - centre)[:, None] * geometry.pixel_m
    components = [upsample(np.broadcast_to(c, samples).astype(np.float32), shape)
                  for c in displacement(source, east, north)]
    los = np.zeros((geometry.size, geometry.size), np.float32)
    los[rows, cols] = line_of_sight(*components, tuple(v[:, cols] if v.shape[1] > 1 else v for v in geometry.los))
    span = float(los.max() - los.min())
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"source {source} produces no finite deformation on a {geometry.size}² frame")
    return los / np.float32(span)


@dataclass
class SeriesSource:
    """One source of a series: its unit LOS field and its fringe count for each pair it appears in."""

    kind: str
    ellipse: Ellipse
    levels: dict[int, str]  # pair position → intensity level
    field: np.ndarray | None = None
    fringes: dict[int, float] | None = None

    @property
    def earthquake(self) -> bool:
        return self.kind == "Earthquake"


def _match(sources: list[SeriesSource], kind: str, ellipse: Ellipse, pixel_m: float) -> SeriesSource | None:
    for source in sources:
        near = np.hypot(source.ellipse.col - ellipse.col, source.ellipse.row - ellipse.row) * pixel_m
        if source.kind == kind and near <= max(source.ellipse.major_m, ellipse.major_m, 2 * pixel_m):
            return source
    return None


def series_sources(records: list[dict], geometry: Geometry, rng: np.random.Generator) -> list[SeriesSource]:
    """Distinct sources of a series (records in secondary-date order), each computed once."""
    sources: list[SeriesSource] = []
    for position, record in enumerate(records):
        if list(record["label"]) == [schema.NEGATIVE_LABEL]:
            continue
        kinds, levels = record.get("activity_type") or [], record.get("intensity_level") or []
        for k, polygon in enumerate(record.get("segmentation_mask") or []):
            kind = kinds[k] if k < len(kinds) else (kinds[-1] if kinds else "Unidentified")
            level = levels[k] if k < len(levels) and levels[k] in INTENSITY_FRINGES else "Medium"
            ellipse = polygon_ellipse(polygon, geometry.pixel_m)
            found = _match(sources, kind, ellipse, geometry.pixel_m)
            if found is None:
                sources.append(SeriesSource(kind, ellipse, {position: level}))
            else:
                found.levels.setdefault(position, level)
    for source in sources:
        positions = sorted(source.levels)
        quantiles = np.sort(rng.uniform(0.0, 1.0, size=len(positions)))  # grows with the secondary date
        source.fringes = {}
        for position, q in zip(positions, quantiles):
            lo, hi = INTENSITY_FRINGES[source.levels[position]]
            source.fringes[position] = float(lo + q * (hi - lo))
        typical = float(np.mean(list(source.fringes.values())))
        source.field = unit_los(size_source(source.kind, source.ellipse, geometry, typical, rng), geometry)
    return sources


def pair_deformation(sources: list[SeriesSource], position: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(LOS deformation in metres, deformation_mask) of the pair at `position` in its series."""
    volcanic = np.zeros(shape, np.float32)
    quake = np.zeros(shape, np.float32)
    for source in sources:
        if source.fringes and position in source.fringes:
            target = quake if source.earthquake else volcanic
            target += np.float32(source.fringes[position] * FRINGE_M) * source.field
    total = volcanic + quake
    mask = np.zeros(shape, np.uint8)
    footprint = np.abs(total) >= np.float32(MASK_FRACTION * FRINGE_M)
    mask[footprint] = schema.MASK_VOLCANIC
    mask[footprint & (np.abs(quake) > np.abs(volcanic))] = schema.MASK_EARTHQUAKE
    return total, mask
