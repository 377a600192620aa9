"""Sentinel-1 viewing geometry, displacement → phase, wrapping, and coherence-consistent phase noise."""
from __future__ import annotations

import functools

import numpy as np

WAVELENGTH_M = 0.055466
FRINGE_M = WAVELENGTH_M / 2  # one 2π cycle of interferometric phase = λ/2 of LOS motion
HEADING_ASCENDING_DEG, HEADING_DESCENDING_DEG = -12.0, -168.0
INCIDENCE_RANGE_DEG = (29.0, 46.0)


def incidence_deg(width: int, descending: bool) -> np.ndarray:
    """Incidence angle per column (1, W): grows along the look direction (east when ascending,
    west when descending, since Sentinel-1 looks right)."""
    near, far = INCIDENCE_RANGE_DEG
    ramp = np.linspace(near, far, width, dtype=np.float32)
    return (ramp[::-1] if descending else ramp)[None, :]


def los_unit_vector(incidence: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-to-satellite unit vector ŝ = (−cos h·sin θ, sin h·sin θ, cos θ) in ENU."""
    heading = np.radians(HEADING_DESCENDING_DEG if descending else HEADING_ASCENDING_DEG)
    theta = np.radians(incidence)
    return (
        (-np.cos(heading) * np.sin(theta)).astype(np.float32),
        (np.sin(heading) * np.sin(theta)).astype(np.float32),
        np.cos(theta).astype(np.float32),
    )


def line_of_sight(ue: np.ndarray, un: np.ndarray, uz: np.ndarray, los: tuple[np.ndarray, ...]) -> np.ndarray:
    """d_LOS = u·ŝ (positive = motion towards the satellite)."""
    return (ue * los[0] + un * los[1] + uz * los[2]).astype(np.float32)


def los_to_phase(d_los: np.ndarray) -> np.ndarray:
    """φ = −(4π/λ)·d_LOS: motion towards the satellite shortens the path and decreases phase."""
    return (np.float32(-4 * np.pi / WAVELENGTH_M) * d_los).astype(np.float32)


def wrap(phase: np.ndarray) -> np.ndarray:
    """Wrap to [−π, π) as float32: φ − 2π·⌊(φ + π)/2π⌋ is several times faster than np.mod on
    floats; float32 rounding can leave a value a hair outside the range, so fold those back."""
    pi, two_pi = np.float32(np.pi), np.float32(2 * np.pi)
    phase = phase.astype(np.float32, copy=False)
    wrapped = phase - two_pi * np.floor((phase + pi) * np.float32(1 / (2 * np.pi)))
    np.putmask(wrapped, wrapped >= pi, wrapped - two_pi)
    np.putmask(wrapped, wrapped < -pi, wrapped + two_pi)
    return wrapped


class PhaseNoiseTable:
    """Pre-simulated (phase noise, estimated coherence) samples for `levels` true-coherence values.

    Per level: a, b ~ CN(0,1)^L, s₂ = γa + √(1−γ²)b, z = Σ a·s₂*; noise = arg z and the estimate
    |z|/√(Σ|a|²Σ|s₂|²). Drawing a random column per pixel is ~2 ms at 512² instead of simulating L looks.
    """

    def __init__(self, looks: int = 16, levels: int = 64, samples: int = 1024, seed: int = 20240601) -> None:
        rng = np.random.default_rng(seed)
        gamma = np.linspace(0.0, 0.99, levels)[:, None, None]
        shape = (levels, samples, looks)

        def cn() -> np.ndarray:
            return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / np.sqrt(2)

        a, b = cn(), cn()
        s2 = gamma * a + np.sqrt(1 - gamma**2) * b
        z = (a * np.conj(s2)).sum(-1)
        power = np.sqrt((np.abs(a) ** 2).sum(-1) * (np.abs(s2) ** 2).sum(-1))
        self.levels = levels
        self.noise = np.angle(z).astype(np.float32)
        self.coherence = (np.abs(z) / power).astype(np.float32)

    def sample(self, gamma: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Phase noise and estimated coherence for true coherence `gamma` (clipped to [0, 0.99])."""
        samples = self.noise.shape[1]
        level = np.rint(np.clip(gamma, 0.0, 0.99) * np.float32((self.levels - 1) / 0.99)).astype(np.int32)
        flat = level * np.int32(samples) + rng.integers(0, samples, size=gamma.shape, dtype=np.int32)
        return self.noise.ravel().take(flat), self.coherence.ravel().take(flat)


@functools.lru_cache(maxsize=2)
def noise_table(looks: int = 16) -> PhaseNoiseTable:
    """One table per process (fixed seed, so every process draws from the same table)."""
    return PhaseNoiseTable(looks=looks)
