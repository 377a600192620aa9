"""The data layer's plain value types: what a sample is, where it is cropped, what a read returns.

Pure data with no imports from the rest of the package, so that every other data module (index,
cube reads, transforms, shards, sources) can depend on these types without depending on each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One time series of the index: T (primary, secondary) pairs of one frame and their labels."""

    key: str  # "{frame}-{primary}-{uid_uid_...}": unique, stable, no dots
    frame_id: str
    primary_date: str
    secondary_dates: tuple[str, ...]  # length T
    unique_ids: tuple[int, ...]
    member_positive: tuple[bool, ...]
    label: int
    split: str


class Window(NamedTuple):
    """A crop in frame pixels: top-left (row, col) and size."""

    row: int
    col: int
    height: int
    width: int

    def describe(self) -> str:
        return f"rows {self.row}:{self.row + self.height}, cols {self.col}:{self.col + self.width}"


@dataclass
class RawSample:
    """A sample as read (from a cube or a shard), before targets, normalisation and augmentation."""

    image: np.ndarray  # float32 (T, C, h, w), unnormalised, in `channels` order
    mask: np.ndarray  # uint8 (T, h, w), raw cube values (0/1/2)
    key: str
    meta: dict[str, Any]  # JSON-serialisable


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be read or decoded: where from (cube or shard URL), key and why."""

    origin: str
    key: str
    reason: str
