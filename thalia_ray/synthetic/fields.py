"""Spectral random fields and resampling shared by the atmosphere and terrain models.

Both turbulent delay and fractal topography are power-law random fields; generating them once here
(float32, real FFTs) keeps the two models consistent and fast (a 512² field takes a few ms).
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.fft
from scipy import ndimage


OUTER_SCALE_STEP_M = 500.0  # window variances are evaluated on this grid of outer scales (≤ 0.7 % off, cached)


def window_variances(extent_m: float, reference_extent_m: float, pixel_m: float, exponent: float,
                     outer_scale_m: float) -> tuple[float, float]:
    """(variance inside a square window of `extent_m`, its mean removed; the part of it from waves too
    long for the window's own grid), as fractions of the variance over a (periodic) frame of
    `reference_extent_m`; (1, 0) when the window is not smaller than that frame.

    A mode of wavenumber k keeps 1 − sinc²(kₓL)·sinc²(k_yL) of its variance in a window of side L, so
    the window sees Σ P(k)(1 − sinc²sinc²) / Σ P(k) (sum over the frame's modes). The ratios change
    slowly with the outer scale: they are evaluated at the nearest OUTER_SCALE_STEP_M so that per-date
    draws of a random outer scale share a cache.
    """
    if extent_m >= reference_extent_m:
        return 1.0, 0.0
    outer = max(round(outer_scale_m / OUTER_SCALE_STEP_M), 1) * OUTER_SCALE_STEP_M
    return _window_variances(float(extent_m), float(reference_extent_m), float(pixel_m), float(exponent), outer)


@functools.lru_cache(maxsize=256)
def _window_variances(extent_m: float, reference_extent_m: float, pixel_m: float, exponent: float,
                      outer_m: float) -> tuple[float, float]:
    n = max(int(round(reference_extent_m / pixel_m)), 2)
    k = np.fft.rfftfreq(n, d=pixel_m)
    weight = np.full(k.shape, 2.0)  # ± frequencies, except zero and an even grid's Nyquist
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    scaled = (k * outer_m).astype(np.float32) ** 2  # P ∝ ((k·outer)² + 1)^(−exponent); the constant cancels
    power = ((scaled[:, None] + scaled[None, :] + np.float32(1.0)) ** np.float32(-exponent)).astype(np.float64)
    power *= weight[:, None] * weight[None, :]
    power[0, 0] = 0.0
    kept = np.sinc(k * extent_m) ** 2
    seen = power * (1.0 - kept[:, None] * kept[None, :])
    long = k < 0.5 / extent_m  # below the window grid's first mode
    total = float(power.sum())
    return float(seen.sum()) / total, float(seen[np.ix_(long, long)].sum()) / total


def window_std(extent_m: float, reference_extent_m: float, pixel_m: float, exponent: float, outer_scale_m: float) -> float:
    """Expected std inside a window of `extent_m` of a field with unit std over `reference_extent_m`."""
    return float(np.sqrt(window_variances(extent_m, reference_extent_m, pixel_m, exponent, outer_scale_m)[0]))


def power_law_field(
    shape: tuple[int, int], pixel_m: float, exponent: float, outer_scale_m: float, rng: np.random.Generator,
    reference_extent_m: float | None = None,
) -> np.ndarray:
    """Zero-mean field with amplitude spectrum (k² + k₀²)^(−exponent/2), k in cycles/m.

    `exponent` is half the power-spectrum slope: (β+1)/2 for the doc's turbulence, H+1 for terrain.
    Unit std over the grid. With `reference_extent_m` larger than the grid, the grid is a window of a
    unit-std frame of that extent: it gets the window's expected variance, the part from waves longer
    than the window as a random plane (what such a wave looks like across it), the rest on its own
    scales, so that both its variance and its pixel-scale roughness match a window cut from the frame.
    """
    h, w = shape
    ky = scipy.fft.fftfreq(h, d=pixel_m).astype(np.float32)[:, None]
    kx = scipy.fft.rfftfreq(w, d=pixel_m).astype(np.float32)[None, :]
    k0 = np.float32(1.0 / outer_scale_m)
    filt = (kx * kx + ky * ky + k0 * k0) ** np.float32(-exponent / 2.0)
    filt[0, 0] = 0.0
    white = rng.standard_normal(shape, dtype=np.float32)
    field = scipy.fft.irfft2(scipy.fft.rfft2(white) * filt, s=shape).astype(np.float32)
    std = float(field.std())
    field = field / np.float32(std if std > 0 else 1.0)
    side = max(h, w)
    if reference_extent_m is None or side * pixel_m >= reference_extent_m:
        return field
    total, long = window_variances(side * pixel_m, reference_extent_m, pixel_m, exponent, outer_scale_m)
    slope = rng.standard_normal(2) * np.sqrt(6.0 * long) / side  # E[var of a·x + b·y over the window] = long
    rows, cols = np.arange(h, dtype=np.float32) - (h - 1) / 2, np.arange(w, dtype=np.float32) - (w - 1) / 2
    plane = np.float32(slope[0]) * rows[:, None] + np.float32(slope[1]) * cols[None, :]
    return field * np.float32(np.sqrt(total - long)) + plane


def smooth(field: np.ndarray, pixel_m: float, scale_m: float) -> np.ndarray:
    """Gaussian low-pass whose full width at half maximum is `scale_m` (e.g. ERA5's ~25 km)."""
    sigma = scale_m / pixel_m / 2.355
    return ndimage.gaussian_filter(field.astype(np.float32), sigma=sigma, mode="nearest")


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights; first and last samples of both grids coincide."""
    position = np.linspace(0.0, n_in - 1, n_out)
    low = np.clip(np.floor(position).astype(int), 0, max(n_in - 2, 0))
    frac = position - low
    weights = np.zeros((n_out, n_in), np.float32)
    weights[np.arange(n_out), low] = 1 - frac
    if n_in > 1:
        weights[np.arange(n_out), low + 1] += frac
    return weights


def upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a smooth field sampled on a coarser grid whose corner samples sit on
    the corner pixels of `shape`; two small matrix products (BLAS) instead of a generic zoom."""
    if field.shape == shape:
        return field.astype(np.float32)
    rows = _interpolation_matrix(shape[0], field.shape[0])
    cols = _interpolation_matrix(shape[1], field.shape[1])
    return (rows @ field.astype(np.float32) @ cols.T).astype(np.float32)
