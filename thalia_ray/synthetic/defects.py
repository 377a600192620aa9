"""Data-quality defects that annotators flag: corrupted pairs, debursting (processing) errors,
missing data and image artifacts. Each takes (phase, coherence) and returns modified copies."""
from __future__ import annotations

import numpy as np

BURSTS, SUBSWATHS = 9, 3  # Sentinel-1 IW: 3 sub-swaths of ~9 bursts each per frame


def corrupt(phase: np.ndarray, coherence: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A corrupted interferogram: uniformly random phase and near-zero coherence everywhere."""
    noise = rng.uniform(-np.pi, np.pi, size=phase.shape).astype(np.float32)
    return noise, (coherence * np.float32(0.1)).astype(np.float32)


def burst_steps(phase: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Debursting error: a constant phase jump per burst and sub-swath (stronger for severity 3)."""
    h, w = phase.shape
    rows = np.minimum(np.arange(h) * BURSTS // h, BURSTS - 1)
    cols = np.minimum(np.arange(w) * SUBSWATHS // w, SUBSWATHS - 1)
    jumps = rng.uniform(-1.0, 1.0, size=(BURSTS, SUBSWATHS)).astype(np.float32) * np.float32(0.8 * severity)
    return phase + jumps[rows[:, None], cols[None, :]]


def missing_block(phase: np.ndarray, coherence: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """No information over a large part of the frame (30–70 % of one side): zero phase and coherence."""
    h, w = phase.shape
    phase, coherence = phase.copy(), coherence.copy()
    cut = int(rng.uniform(0.3, 0.7) * (w if rng.random() < 0.5 else h))
    region = (slice(None), slice(0, cut)) if rng.random() < 0.5 else (slice(0, cut), slice(None))
    phase[region] = 0.0
    coherence[region] = 0.0
    return phase, coherence


def stripes(phase: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Image artifacts: a few thin stripes of random phase across the frame."""
    h, w = phase.shape
    phase = phase.copy()
    for _ in range(int(rng.integers(2, 6))):
        width = max(1, int(rng.uniform(0.005, 0.02) * h))
        start = int(rng.integers(0, h - width))
        phase[start:start + width] = rng.uniform(-np.pi, np.pi, size=(width, w)).astype(np.float32)
    return phase
