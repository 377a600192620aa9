"""Tropospheric and orbital nuisance signals, and the ERA5 channels tied to the stratified delay.

Everything here is per *acquisition*: the generator draws one state per date and differences two
of them, so the primary's atmosphere is common to every pair of a time series.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thalia_ray.synthetic.fields import power_law_field, upsample
from thalia_ray.synthetic.phase import FRINGE_M

TURBULENCE_BETA = 8.0 / 3.0
WET_DELAY_PER_TCWV = 6.5e-3  # m of zenith wet delay per kg m⁻² of water vapour
HYDROSTATIC_PER_HPA = 2.2768e-3  # m of zenith hydrostatic delay per hPa
PRESSURE_SCALE_HEIGHT_M = 8000.0
GRAVITY = 9.81


TURBULENCE_GRID = 256  # the steep spectrum has little power below 2 pixels at 512²: draw at ≤ 256², upsample


def turbulence(shape: tuple[int, int], pixel_m: float, rng: np.random.Generator,
               reference_extent_m: float | None = None) -> np.ndarray:
    """Turbulent delay field: power law β = 8/3 with an outer scale of 20–50 km; unit std over the
    frame, or over `reference_extent_m` when the frame is a smaller window (see `power_law_field`)."""
    outer = float(rng.uniform(20e3, 50e3))
    coarse = (min(shape[0], TURBULENCE_GRID), min(shape[1], TURBULENCE_GRID))
    step = pixel_m * (shape[0] - 1) / max(coarse[0] - 1, 1)
    field = power_law_field(coarse, step, (TURBULENCE_BETA + 1) / 2, outer, rng, reference_extent_m)
    return upsample(field, shape)


@dataclass(frozen=True)
class Weather:
    """Sea-level state of one acquisition: water vapour W₀ (kg m⁻²), pressure P₀ (Pa), mean
    column temperature T̄ (K); the vapour scale height is a property of the frame."""

    water_vapour: float
    pressure: float
    temperature: float


def era5_channels(weather: Weather, wet_smooth: np.ndarray, dry_smooth: np.ndarray) -> dict[str, np.ndarray]:
    """ERA5-like TCWV = W₀e^(−h̄/H_w), SP = P₀e^(−h̄/8 km), VIT = T̄·SP/g on the ~25 km smoothed DEM h̄,
    from the same W₀, P₀ as the delay (`wet_smooth`, `dry_smooth`: the two exponentials of h̄)."""
    tcwv = np.float32(weather.water_vapour) * wet_smooth
    sp = np.float32(weather.pressure) * dry_smooth
    vit = np.float32(weather.temperature / GRAVITY) * sp
    return {
        "total_column_water_vapour": tcwv.astype(np.float32),
        "surface_pressure": sp.astype(np.float32),
        "vertical_integral_of_temperature": vit.astype(np.float32),
    }


def stratified_delay(
    water_vapour: float, pressure_pa: float, wet_profile: np.ndarray, dry_profile: np.ndarray, cos_incidence: np.ndarray
) -> np.ndarray:
    """Slant delay (m) = [6.5e-3·W₀e^(−h/H_w) + 2.2768e-3·P₀[hPa]e^(−h/8 km)] / cos θ.

    `wet_profile` = e^(−h/H_w) and `dry_profile` = e^(−h/8 km) are precomputed per frame.
    """
    zenith = (WET_DELAY_PER_TCWV * water_vapour) * wet_profile + (HYDROSTATIC_PER_HPA * pressure_pa / 100) * dry_profile
    return (zenith / cos_incidence).astype(np.float32)


def orbital_ramp(shape: tuple[int, int], pixel_m: float, fringes_per_50km: float, rng: np.random.Generator) -> np.ndarray:
    """Planar (plus a little quadratic) LOS ramp in metres with the given gradient in a random direction."""
    h, w = shape
    angle = rng.uniform(0, 2 * np.pi)
    step = np.float32(pixel_m)
    # distance along the ramp direction as an outer sum of a column and a row: one full-size pass
    along = (np.arange(h, dtype=np.float32) * (step * np.float32(np.sin(angle))))[:, None] + \
        (np.arange(w, dtype=np.float32) * (step * np.float32(np.cos(angle))))[None, :]
    gradient = fringes_per_50km * FRINGE_M / 50e3  # metres of LOS per metre
    quad = rng.uniform(-0.2, 0.2) * gradient / (max(h, w) * pixel_m)
    along *= np.float32(quad) * along + np.float32(gradient)
    return along
