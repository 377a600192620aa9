"""Static scene of a frame: volcanic DEM, radar geometry masks, and the coherence / glacier models."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thalia_ray.synthetic.fields import power_law_field

TERRAIN_HURST = 0.8
SITE_MIN_HEIGHT_M = 100.0  # annotated deformation was seen on land: a window keeps its sites above the sea


def _lowest_site(dem: np.ndarray, centres_px: list[tuple[float, float]]) -> float:
    """Lowest height at the (row, col) sites inside the frame; +inf when none is."""
    h, w = dem.shape
    inside = [dem[int(r), int(c)] for r, c in centres_px if 0 <= r < h and 0 <= c < w]
    return float(min(inside)) if inside else float("inf")


def volcano_dem(
    shape: tuple[int, int], pixel_m: float, centres_px: list[tuple[float, float]], rng: np.random.Generator,
    reference_extent_m: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(height m, water mask): base level + fractal relief + cones h₀ + H(1 − r/R)₊^1.5 − crater.

    Cones sit at `centres_px` (row, col) — the deforming volcanoes; land below sea level becomes water.
    A frame of the published extent (`reference_extent_m` None) sees whole cones on a base level.
    A smaller window (`reference_extent_m` = the published extent) sits on part of an edifice: its
    relief keeps the roughness of its own scales, and the base level becomes the window's mean height,
    drawn like a whole frame's, so that windows centred on volcanoes keep the real height statistics,
    raised where needed so that the deforming sites stand above sea level.
    """
    h, w = shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    base = rng.exponential(1400.0) - 450.0  # most volcanoes sit low, a few on high plateaus
    relief = power_law_field(shape, pixel_m, TERRAIN_HURST + 1, 60e3, rng, reference_extent_m)
    dem = np.float32(base) + relief * np.float32(rng.uniform(200.0, 700.0))
    for row, col in centres_px:
        height, radius = rng.uniform(800.0, 3000.0), rng.uniform(6e3, 15e3)
        r = np.hypot(rows - row, cols - col) * np.float32(pixel_m)
        dem += np.float32(height) * np.clip(1 - r / np.float32(radius), 0, None) ** 1.5
        crater_r = 0.08 * radius
        dem -= np.float32(0.05 * height) * np.clip(1 - r / np.float32(crater_r), 0, None)
    if reference_extent_m is not None:
        dem += np.float32(base) - np.float32(dem.mean())
        dem += np.float32(max(0.0, SITE_MIN_HEIGHT_M - _lowest_site(dem, centres_px)))
    water = dem < 0
    dem[water] = 0.0
    return dem.astype(np.float32), water


def geometric_coherence(
    dem: np.ndarray, water: np.ndarray, pixel_m: float, incidence_deg: np.ndarray, descending: bool
) -> np.ndarray:
    """γ_geo: decorrelation grows with terrain slope; 0 on water, layover and shadow.

    Layover: ground slope facing the radar steeper than the incidence; shadow: slope facing away
    steeper than 90° − incidence. The radar looks east when ascending, west when descending.
    """
    grad_rows, grad_cols = np.gradient(dem, pixel_m)
    facing = grad_cols if not descending else -grad_cols  # rising along the look direction faces the radar
    slope_deg = np.degrees(np.arctan(facing))
    layover = slope_deg > incidence_deg
    shadow = -slope_deg > 90.0 - incidence_deg
    gamma = 1.0 / (1.0 + 1.5 * np.hypot(grad_rows, grad_cols))
    gamma[water | layover | shadow] = 0.0
    return gamma.astype(np.float32)


@dataclass(frozen=True)
class CoherenceModel:
    """γ = γ_geo·γ_temp·γ_snow + small fractal noise (docs §3); per-frame constants drawn once."""

    geometric: np.ndarray
    infinite: np.ndarray  # γ∞ = 0.1 + 0.6(1 − v), v = sigmoid((h_v − h)/300 m)
    texture: np.ndarray  # unit-std fractal field for the noise term
    dem: np.ndarray
    tau_days: float
    snow_line_m: float

    @classmethod
    def draw(cls, dem: np.ndarray, geometric: np.ndarray, pixel_m: float, rng: np.random.Generator,
             reference_extent_m: float | None = None) -> "CoherenceModel":
        vegetation_m = rng.uniform(1500.0, 4000.0)
        vegetation = 1.0 / (1.0 + np.exp(-(vegetation_m - dem) / 300.0))
        return cls(
            geometric=geometric,
            infinite=(0.1 + 0.6 * (1.0 - vegetation)).astype(np.float32),
            texture=power_law_field(dem.shape, pixel_m, TERRAIN_HURST + 1, 20e3, rng, reference_extent_m),
            dem=dem,
            tau_days=float(rng.uniform(10.0, 40.0)),
            snow_line_m=float(rng.uniform(2000.0, 4500.0)),
        )

    def snow_line(self, day_of_year: int) -> float:
        """Snow line of one date: lowest in (northern) mid-winter, out of reach in summer."""
        winter = np.cos(2 * np.pi * (day_of_year - 15) / 365.25)
        return self.snow_line_m + (1.0 - winter) * 2000.0

    def gamma(self, baseline_days: float, snow_lines: tuple[float, float], low_coherence: bool,
              rng: np.random.Generator) -> np.ndarray:
        temporal = self.infinite + (1.0 - self.infinite) * np.float32(np.exp(-baseline_days / self.tau_days))
        snow = np.where(self.dem > min(snow_lines), np.float32(0.25), np.float32(1.0))
        gamma = self.geometric * temporal * snow
        if low_coherence:
            gamma = gamma * np.float32(rng.uniform(0.2, 0.5))
        gamma = gamma + np.float32(rng.uniform(0.02, 0.06)) * self.texture * (self.geometric > 0)
        return np.clip(gamma, 0.0, 0.99).astype(np.float32)


def glacier_phase(dem: np.ndarray, n_fringes: float, ice_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(phase, ice mask): 2πN_g(h − h_ice)/(h_max − h_ice) above h_ice, with h_ice a fraction of the relief."""
    h_max, h_min = float(dem.max()), float(dem.min())
    h_ice = h_min + ice_fraction * (h_max - h_min)
    ice = dem > h_ice
    phase = np.where(ice, 2 * np.pi * n_fringes * (dem - h_ice) / max(h_max - h_ice, 1.0), 0.0)
    return phase.astype(np.float32), ice
