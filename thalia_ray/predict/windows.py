"""Sliding windows over a whole frame and the blending that stitches their predictions back.

Windows have the run's crop size and overlap by at least the requested fraction; their starts are
spread evenly from 0 to `size - crop`, so the last window ends on the frame's edge and every pixel
is covered whatever the frame size (a frame smaller than the crop is one window, padded by the
reader). Predictions are averaged with weights that fall off linearly towards a window's edges,
where a convolutional model sees the least context; every weight is positive, so a pixel covered
by a single window keeps that window's value exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from thalia_ray.predict.inputs import Window


def starts(size: int, crop: int, overlap: float) -> list[int]:
    """Window starts along one axis of `size` pixels: evenly spread, first 0, last `size - crop`."""
    if size < 1 or crop < 1:
        raise ValueError(f"size and crop must be positive, got size {size}, crop {crop}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= crop:
        return [0]
    stride = max(1, crop - math.ceil(overlap * crop))
    count = math.ceil((size - crop) / stride) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - crop, count)})


def tile(shape: tuple[int, int], crop: int, overlap: float) -> list[Window]:
    """Every window of a (height, width) frame, row-major; windows are clipped to frames smaller than the crop."""
    height, width = shape
    return [Window(r, c, min(crop, height), min(crop, width))
            for r in starts(height, crop, overlap) for c in starts(width, crop, overlap)]


def ramp(length: int, margin: int) -> np.ndarray:
    """1-D weights rising linearly over `margin` pixels from each end, all in (0, 1]."""
    distance = np.minimum(np.arange(length), np.arange(length)[::-1]) + 1
    return np.minimum(distance / max(margin, 1), 1.0).astype(np.float32)


def blend_weights(crop: int, overlap: float) -> np.ndarray:
    """(crop, crop) weights: the outer product of two ramps as wide as half the overlap."""
    one = ramp(crop, max(1, math.ceil(overlap * crop / 2)))
    return np.outer(one, one)


@dataclass
class Stitcher:
    """Weighted sum and weight total of one frame; `result` once every expected window was added."""

    shape: tuple[int, int]
    expected: int
    weights: np.ndarray
    total: np.ndarray = field(init=False)
    weight: np.ndarray = field(init=False)
    added: int = 0

    def __post_init__(self) -> None:
        self.total = np.zeros(self.shape, dtype=np.float32)
        self.weight = np.zeros(self.shape, dtype=np.float32)

    def add(self, window: Window, values: np.ndarray) -> None:
        """Blend one window's (crop, crop) prediction; the part beyond a small frame is ignored."""
        rows = slice(window.row, window.row + window.height)
        cols = slice(window.col, window.col + window.width)
        w = self.weights[:window.height, :window.width]
        self.total[rows, cols] += w * values[:window.height, :window.width]
        self.weight[rows, cols] += w
        self.added += 1

    @property
    def complete(self) -> bool:
        return self.added >= self.expected

    def result(self) -> np.ndarray:
        if not self.complete or not (self.weight > 0).all():
            raise ValueError(f"frame of {self.shape} not covered: {self.added} of {self.expected} windows added")
        return self.total / self.weight
