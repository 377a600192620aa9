"""Geographical and seasonal pretext targets, after Phileo's geographic expert: where a frame lies on the
sphere, when in the year its images were taken, and which frame it is.

Frame positions come from a public table shipped with the package (`volcanoes.csv`: the Smithsonian
Global Volcanism Program's Holocene volcano list, as distributed by the NOAA NCEI Volcano Location
Database, for the volcanoes the Thalia dataset's `frame_names.json` names). A frame's position is the
mean direction of its named volcanoes. A name the list holds more than once (there is a Cerro Azul in
Chile and one on the Galápagos) takes the candidate nearest the frame's unambiguous volcanoes. Frames
whose names the table lacks (the synthetic generator's sampled frames) have no position: the location
head skips them. Climate zones are left out: no climate-zone table is available offline here.
"""
from __future__ import annotations

import csv
import functools
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from importlib import resources
from typing import Mapping, Sequence

import numpy as np

VOLCANO_TABLE = "volcanoes.csv"
TABLE_SOURCE = ("Smithsonian Institution, Global Volcanism Program, Volcanoes of the World (Holocene volcano list), "
                "via the NOAA NCEI Volcano Location Database")
Position = tuple[float, float, float]  # a unit vector: x towards (0°N, 0°E), z towards the north pole


@dataclass(frozen=True)
class Volcano:
    name: str
    country: str
    latitude: float
    longitude: float
    gvp_number: int | None

    @property
    def position(self) -> np.ndarray:
        return unit_vector(self.latitude, self.longitude)


def normalise_name(name: str) -> str:
    """Case, accents, underscores, hyphens and punctuation removed: `Payún Matrú` ~ `payun_matru`."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9 ]", "", ascii_name.replace("_", " ").replace("-", " ")).strip()


def _spellings(name: str, alias: str) -> set[str]:
    """A list name (`Azul, Cerro`) is looked up as written, inverted (`Cerro Azul`), by its first part and
    by the dataset's spelling (`alias`)."""
    spellings = {name, alias} - {""}
    if "," in name:
        head, tail = (part.strip() for part in name.split(",", 1))
        spellings |= {f"{tail} {head}", head}
    return {normalise_name(s) for s in spellings}


@functools.lru_cache(maxsize=1)
def volcano_table() -> dict[str, tuple[Volcano, ...]]:
    """Normalised spelling → the volcanoes of the shipped table that go by it."""
    text = resources.files(__package__).joinpath(VOLCANO_TABLE).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    table: dict[str, list[Volcano]] = {}
    for row in rows:
        volcano = Volcano(row["name"], row["country"], float(row["latitude"]), float(row["longitude"]),
                          int(row["gvp_number"]) if row["gvp_number"] else None)
        for spelling in _spellings(row["name"], row["alias"]):
            if volcano not in table.setdefault(spelling, []):
                table[spelling].append(volcano)
    return {spelling: tuple(volcanoes) for spelling, volcanoes in table.items()}


def unit_vector(latitude: float, longitude: float) -> np.ndarray:
    lat, lon = math.radians(latitude), math.radians(longitude)
    return np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])


def latitude_longitude(position: Sequence[float]) -> tuple[float, float]:
    x, y, z = (float(v) for v in position)
    return math.degrees(math.atan2(z, math.hypot(x, y))), math.degrees(math.atan2(y, x))


def _mean_direction(vectors: Sequence[np.ndarray]) -> np.ndarray:
    total = np.sum(vectors, axis=0)
    return total / np.linalg.norm(total)


def frame_position(names: Sequence[str], table: Mapping[str, Sequence[Volcano]] | None = None) -> Position | None:
    """The mean direction of the named volcanoes the table knows; None when it knows none of them.
    A name with several candidates takes the one nearest the unambiguous ones (skipped without them)."""
    table = volcano_table() if table is None else table
    candidates = [table[key] for key in (normalise_name(n) for n in names) if table.get(key)]
    sure = [c[0].position for c in candidates if len(c) == 1]
    if not sure:
        return None
    centre = _mean_direction(sure)
    picked = [max(c, key=lambda v: float(v.position @ centre)).position for c in candidates if len(c) > 1]
    x, y, z = _mean_direction(sure + picked)
    return float(x), float(y), float(z)


def frame_positions(frame_names: Mapping[str, Sequence[str]]) -> dict[str, Position]:
    """frame id → position, for the frames whose volcanoes the table knows."""
    positions = {frame: frame_position(names) for frame, names in frame_names.items()}
    return {frame: position for frame, position in positions.items() if position is not None}


def day_of_year_encoding(day: str | date) -> tuple[float, float]:
    """(sin, cos) of the day's angle through its year, 2π·(day of year − 1)/(days in that year): one full
    turn per year, so 31 December and 1 January are neighbours like any two consecutive days."""
    when = day if isinstance(day, date) else date(int(day[:4]), int(day[4:6]), int(day[6:8]))
    days = (date(when.year + 1, 1, 1) - date(when.year, 1, 1)).days
    angle = 2 * math.pi * (when.timetuple().tm_yday - 1) / days
    return math.sin(angle), math.cos(angle)


def sphere_points(count: int) -> np.ndarray:
    """`count` unit vectors spread evenly over the sphere (a Fibonacci lattice): the centres of the
    location head's von Mises–Fisher mixture."""
    i = np.arange(count, dtype=np.float64) + 0.5
    z = 1 - 2 * i / count
    radius = np.sqrt(1 - z ** 2)
    angle = math.pi * (3 - math.sqrt(5)) * i
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)
