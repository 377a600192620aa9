"""What a predict job runs over: units (one interferogram, or one series of the run's T), by frame.

`annotated` takes the series of the dataset's time-series index (every split), built by the same
rules as training's index. `all` and a date range take every pair the cubes hold and, for T > 1,
every series the index's enumeration gives over them; the annotated label is attached wherever all
members of a unit are annotated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from thalia_ray.errors import ThaliaError
from thalia_ray.predict import inputs
from thalia_ray.storage import Location

_RANGE = re.compile(r"^(\d{8})?:(\d{8})?$")


class PlanError(ThaliaError, ValueError):
    """A predict request that names frames or pairs the data cannot give; reported before Ray starts work."""

    exit_code = 2


@dataclass(frozen=True)
class Unit:
    key: str  # "{frame}-{primary}-{secondary_secondary...}": unique, stable, no dots or slashes
    frame_id: str
    primary_date: str
    secondary_dates: tuple[str, ...]
    label: int | None  # annotated label, None where unannotated

    def row(self) -> dict[str, Any]:
        return {"key": self.key, "frame_id": self.frame_id, "primary_date": self.primary_date,
                "secondary_dates": list(self.secondary_dates)}


def make_unit(frame_id: str, primary: str, secondaries: Sequence[str], label: int | None) -> Unit:
    return Unit(inputs.series_key(frame_id, primary, secondaries), frame_id, primary, tuple(secondaries), label)


def parse_pairs(value: str) -> tuple[str, str | None, str | None]:
    """`annotated`, `all` or `YYYYMMDD:YYYYMMDD` (either end open) → (mode, first, last primary date)."""
    if value in ("annotated", "all"):
        return value, None, None
    match = _RANGE.match(value)
    if not match:
        raise PlanError(f"--pairs {value!r}: use annotated, all, or a primary-date range YYYYMMDD:YYYYMMDD")
    return "range", match.group(1), match.group(2)


Labels = dict[tuple[str, str, str], bool]


def _labels(groups: Sequence[inputs.Group]) -> Labels:
    """(frame, primary, secondary) → annotated positive, for every annotated interferogram."""
    return {(g.frame_id, g.primary_date, s): pos for g in groups for s, pos in zip(g.secondary_dates, g.member_positive)}


def _series(group: inputs.Group, length: int, seed: int, label_rule: str, labels: Labels) -> list[Unit]:
    """The group's series of `length` (the index's enumeration), labelled where every member is annotated."""
    units = []
    for positions in inputs.enumerated_positions(group, length, seed):
        secondaries = [group.secondary_dates[p] for p in positions]
        known = [labels.get((group.frame_id, group.primary_date, s)) for s in secondaries]
        label = None if None in known else inputs.series_label(known, label_rule)
        units.append(make_unit(group.frame_id, group.primary_date, secondaries, label))
    return units


def _cube_groups(root: str | Location, frame_id: str, first: str | None, last: str | None) -> list[inputs.Group]:
    """One group per primary date of the pairs the cube holds, within [first, last]."""
    return [
        inputs.Group(frame_id, primary, tuple(secondaries), tuple(range(len(secondaries))),
                     (False,) * len(secondaries), "test")
        for primary, secondaries in inputs.existing_pairs(inputs.open_cube(root, frame_id)).items()
        if not ((first and primary < first) or (last and primary > last))
    ]


def plan_units(root: str | Location, pairs: str, length: int, frames: Sequence[str] | None, seed: int = 0,
               label_rule: str = "union") -> list[Unit]:
    """Every unit to predict, sorted by key. Raises DataError for a root without cubes, PlanError naming a
    requested frame with no cube, or a request that selects no unit at all."""
    mode, first, last = parse_pairs(pairs)
    available = inputs.frame_ids(root)
    if not available:
        raise inputs.DataError(f"--data {root}: no cubes (*{inputs.schema.CUBE_SUFFIX}) to predict on")
    missing = sorted(set(frames or ()) - set(available))
    if missing:
        raise PlanError(f"--frames: no cube for {missing} under {root} (cubes: {available or 'none'})")
    wanted = list(frames) if frames else available
    try:
        annotated = inputs.annotated_groups(root, wanted)
    except inputs.AnnotationError as err:
        if mode == "annotated":
            raise PlanError(f"--pairs annotated needs the annotations: {err} (use --pairs all)") from None
        annotated = []
    if mode == "annotated":
        groups = [g for g in annotated if g.frame_id in set(available)]
    else:
        groups = [g for f in wanted for g in _cube_groups(root, f, first, last)]
    labels = _labels(annotated)
    units = [u for g in groups for u in _series(g, length, seed, label_rule, labels)]
    if not units:
        raise PlanError(f"--pairs {pairs!r}{f' --frames {list(frames)}' if frames else ''}: no interferogram "
                        f"{'series of T=' + str(length) + ' ' if length > 1 else ''}under {root} to predict")
    return sorted({u.key: u for u in units}.values(), key=lambda u: u.key)
