"""The static scene of one frame (geometry, DEM, coherence model, climate) and its per-date
acquisitions (weather, turbulence, ERA5 channels), drawn reproducibly from the frame seed."""
from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date

import numpy as np

from thalia_ray.data import schema
from thalia_ray.synthetic import atmosphere, terrain
from thalia_ray.synthetic.deformation import Geometry, polygon_ellipse
from thalia_ray.synthetic.fields import smooth
from thalia_ray.synthetic.phase import (HEADING_ASCENDING_DEG, HEADING_DESCENDING_DEG, incidence_deg,
                                             los_unit_vector)

PUBLISHED_PIXEL_M = 100.0  # Thalia frames: ~1000 px of 100 m
PUBLISHED_EXTENT_M = schema.PUBLISHED_FRAME_SIZE * PUBLISHED_PIXEL_M
CONE_SEPARATION = 0.1  # of the published extent: closer polygons share one volcano
ERA5_RESOLUTION_M = 25e3
MAX_CONES = 3
SWATH_HALF_WIDTH = 0.42  # of the frame side: the tilted swath leaves no-data corners (~20 % of pixels)


def seed_sequence(seed: int, *parts: str | int) -> np.random.SeedSequence:
    """A child seed from the run seed and stable tags (strings hashed with CRC-32, not `hash`)."""
    words = [int(seed)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.SeedSequence(words)


def rng_for(seed: int, *parts: str | int) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(seed, *parts))


def parse_day(day: str) -> date:
    if len(day) != 8 or not day.isdigit():
        raise ValueError(f"date {day!r} is not YYYYMMDD")
    return date(int(day[:4]), int(day[4:6]), int(day[6:]))


@dataclass(frozen=True)
class Acquisition:
    """The atmosphere of one acquisition date."""

    weather: atmosphere.Weather
    turbulence_m: np.ndarray  # turbulent slant delay (m)
    stratified_m: np.ndarray  # stratified slant delay (m)
    era5: dict[str, np.ndarray]
    snow_line_m: float


@dataclass(frozen=True)
class Scene:
    frame_id: str
    seed: int  # the frame seed, derived from (run seed, frame id)
    geometry: Geometry
    descending: bool
    cos_incidence: np.ndarray
    dem: np.ndarray
    era5_profiles: tuple[np.ndarray, np.ndarray]  # e^(−h̄/H_w), e^(−h̄/8 km) on the smoothed DEM
    wet_profile: np.ndarray
    dry_profile: np.ndarray
    coherence: terrain.CoherenceModel
    valid: np.ndarray  # inside the radar swath; outside, products hold zeros
    climate: tuple[float, float, float]  # mean W₀ (kg m⁻²), its seasonal amplitude, mean T̄ (K)
    window_of_m: float | None  # None: the frame spans the published extent; else the extent it is a window of


def _cone_centres(records: list[dict], size: int, separation_px: float,
                  rng: np.random.Generator) -> list[tuple[float, float]]:
    """Volcano positions (row, col): the distinct deformation polygons, else random spots."""
    centres: list[tuple[float, float]] = []
    for record in records:
        for polygon in record.get("segmentation_mask") or []:
            e = polygon_ellipse(polygon, 1.0)
            if all(np.hypot(e.row - r, e.col - c) > separation_px for r, c in centres) and len(centres) < MAX_CONES:
                centres.append((e.row, e.col))
    if not centres:
        centres = [tuple(rng.uniform(0.2, 0.8, size=2) * size) for _ in range(int(rng.integers(1, 3)))]
    return centres


def swath_footprint(size: int, descending: bool) -> np.ndarray:
    """Pixels inside the imaged swath: a band tilted by the ~12° off-north track of the satellite.

    Real geocoded frames have empty corners (zero phase and coherence); the real statistics show it
    (phase std 1.62 < π/√3 of uniform phase, coherence std > mean).
    """
    heading = np.radians(HEADING_DESCENDING_DEG if descending else HEADING_ASCENDING_DEG)
    rows, cols = np.meshgrid(np.arange(size) - (size - 1) / 2, np.arange(size) - (size - 1) / 2, indexing="ij")
    east, north = cols, -rows
    across = east * np.cos(heading) - north * np.sin(heading)
    return np.abs(across) <= SWATH_HALF_WIDTH * size


def build_scene(frame_id: str, size: int, seed: int, records: list[dict], pixel_m: float | None = None) -> Scene:
    """Everything about a frame that does not change between acquisitions.

    `pixel_m` None: the frame spans the published ~100 km with coarser pixels (polygons given in
    its pixels). A spacing: the frame is a window of `size`·`pixel_m` metres cut from such a frame,
    and its random fields (terrain, turbulence, coherence texture) carry only the variance of the
    scales the window spans.
    """
    frame_seed = int(seed_sequence(seed, frame_id).generate_state(1)[0])
    rng = rng_for(frame_seed, "scene")
    descending = schema.is_descending(frame_id)
    window_of = None if pixel_m is None else PUBLISHED_EXTENT_M
    if pixel_m is None:
        pixel_m = PUBLISHED_EXTENT_M / size
    elif not pixel_m > 0:
        raise ValueError(f"frame {frame_id}: pixel spacing {pixel_m} m must be positive")
    incidence = incidence_deg(size, descending)
    geometry = Geometry(size, pixel_m, los_unit_vector(incidence, descending))
    centres = _cone_centres(records, size, CONE_SEPARATION * PUBLISHED_EXTENT_M / pixel_m, rng)
    dem, water = terrain.volcano_dem((size, size), pixel_m, centres, rng, window_of)
    dem_smooth = smooth(dem, pixel_m, ERA5_RESOLUTION_M)
    geometric = terrain.geometric_coherence(dem, water, pixel_m, incidence, descending)
    vapour_scale = float(rng.uniform(1500.0, 2500.0))
    return Scene(
        frame_id=frame_id,
        seed=frame_seed,
        geometry=geometry,
        descending=descending,
        cos_incidence=np.cos(np.radians(incidence)).astype(np.float32),
        dem=dem,
        era5_profiles=(np.exp(-dem_smooth / vapour_scale).astype(np.float32),
                       np.exp(-dem_smooth / atmosphere.PRESSURE_SCALE_HEIGHT_M).astype(np.float32)),
        wet_profile=np.exp(-dem / vapour_scale).astype(np.float32),
        dry_profile=np.exp(-dem / atmosphere.PRESSURE_SCALE_HEIGHT_M).astype(np.float32),
        coherence=terrain.CoherenceModel.draw(dem, geometric, pixel_m, rng, window_of),
        valid=swath_footprint(size, descending),
        climate=(float(rng.uniform(12.0, 48.0)), float(rng.uniform(3.0, 10.0)), float(rng.uniform(240.0, 262.0))),
        window_of_m=window_of,
    )


def turbulence(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A unit turbulent delay field for `scene` (less variance in a window than over a whole frame)."""
    size = scene.geometry.size
    return atmosphere.turbulence((size, size), scene.geometry.pixel_m, rng, scene.window_of_m)


def draw_acquisition(scene: Scene, day: str) -> Acquisition:
    """Weather and turbulence of one date; the same date always gives the same draw."""
    when = parse_day(day)
    rng = rng_for(scene.seed, "date", when.toordinal())
    mean_w, amplitude, mean_t = scene.climate
    season = np.cos(2 * np.pi * (when.timetuple().tm_yday - 200) / 365.25)
    weather = atmosphere.Weather(
        water_vapour=max(1.0, mean_w + amplitude * season + rng.normal(0.0, 2.0)),
        pressure=101325.0 + rng.normal(0.0, 600.0),
        temperature=mean_t + 6.0 * season + rng.normal(0.0, 2.0),
    )
    sigma = rng.uniform(0.005, 0.008)
    return Acquisition(
        weather=weather,
        turbulence_m=turbulence(scene, rng) * np.float32(sigma),
        stratified_m=atmosphere.stratified_delay(weather.water_vapour, weather.pressure, scene.wet_profile,
                                                 scene.dry_profile, scene.cos_incidence),
        era5=atmosphere.era5_channels(weather, *scene.era5_profiles),
        snow_line_m=scene.coherence.snow_line(when.timetuple().tm_yday),
    )


class AcquisitionCache:
    """Recently used acquisitions of one frame; series are visited in date order, so a few suffice."""

    def __init__(self, scene: Scene, capacity: int = 48) -> None:
        self.scene, self.capacity = scene, capacity
        self._items: OrderedDict[str, Acquisition] = OrderedDict()

    def __getitem__(self, day: str) -> Acquisition:
        if day in self._items:
            self._items.move_to_end(day)
            return self._items[day]
        acquisition = draw_acquisition(self.scene, day)
        self._items[day] = acquisition
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return acquisition
