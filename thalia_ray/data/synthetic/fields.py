"""Spectral random fields and resampling shared by the atmosphere and terrain models.

Both turbulent delay and fractal topography are power-law random fields; generating them once here
(float32, real FFTs) keeps the two models consistent and fast (a 512² field takes a few ms).
"""
from __future__ import annotations

import functools

import numpy as np
import scipy.fft
from scipy import ndimage


def band_variance(k_min: float, k_max: float, k0: float, exponent: float) -> float:
    """∫ (k² + k₀²)^(−exponent) k dk from k_min to k_max (∝ the variance of those scales; exponent > 1)."""
    if exponent <= 1.0:
        raise ValueError(f"exponent={exponent}: the band variance needs a spectrum steeper than k^-2 (exponent > 1)")
    power = 1.0 - exponent
    return float(((k_max**2 + k0**2) ** power - (k_min**2 + k0**2) ** power) / (2.0 * power))


def window_std(extent_m: float, reference_extent_m: float, pixel_m: float, exponent: float, outer_scale_m: float) -> float:
    """Std of a field seen through a window of `extent_m`, relative to one over `reference_extent_m`.

    A window shorter than the wavelengths that carry most of the power sees only the variance of
    the scales it spans (k from 1/extent to the Nyquist frequency); 1 when the window is not smaller.
    """
    if extent_m >= reference_extent_m:
        return 1.0
    k_max, k0 = 0.5 / pixel_m, 1.0 / outer_scale_m
    seen = band_variance(1.0 / extent_m, k_max, k0, exponent)
    return float(np.sqrt(seen / band_variance(1.0 / reference_extent_m, k_max, k0, exponent)))


def power_law_field(
    shape: tuple[int, int], pixel_m: float, exponent: float, outer_scale_m: float, rng: np.random.Generator,
    reference_extent_m: float | None = None,
) -> np.ndarray:
    """Zero-mean field with amplitude spectrum (k² + k₀²)^(−exponent/2), k in cycles/m.

    `exponent` is half the power-spectrum slope: (β+1)/2 for the doc's turbulence, H+1 for terrain.
    Unit std over the grid; with `reference_extent_m`, unit std over a frame of that extent, so a
    smaller window of the same process shows less variance (a 10 km window of a 100 km frame).
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
    if reference_extent_m is None:
        return field
    extent = max(h, w) * pixel_m
    return field * np.float32(window_std(extent, reference_extent_m, pixel_m, exponent, outer_scale_m))


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
