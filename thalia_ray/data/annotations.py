"""Annotation and time-series loading with field-by-field validation.

The published annotations are hand-edited JSON; one bad record must not silently change the
benchmark. Every field is type-checked, and a malformed record is either skipped and reported
(naming its uniqueID and field) or fails the load, as the configuration says.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from thalia_ray.data import schema
from thalia_ray.errors import DataProblem, excerpt
from thalia_ray.storage import Location, local


class AnnotationError(DataProblem):
    """Malformed annotation or time-series metadata; the message names the record and field."""


@dataclass(frozen=True)
class Annotation:
    unique_id: int
    frame_id: str
    primary_date: str  # YYYYMMDD
    secondary_date: str
    labels: tuple[str, ...]
    positive: bool  # "Non_Deformation" not in labels
    activity_types: tuple[str, ...]
    intensity_levels: tuple[str, ...]
    phase: str
    confidence: float
    flags: dict[str, int]
    polygons: tuple[tuple[float, ...], ...]  # flat x, y pixel coordinates, as published
    caption: str


@dataclass(frozen=True)
class LeftOut:
    """A record, or a member of a time series, that the index leaves out, and why. Kept so that nothing is
    dropped without a word: commands count and name these, and a run records them (`left_out.json`)."""

    what: Literal["annotation", "series member"]
    key: str  # the uniqueID; for a series member `{frame}/{primary date}/{uniqueID}`
    reason: str  # the field and what is wrong with it, or why the member cannot be used
    frame_id: str | None = None
    split: str | None = None  # the split of the series it belongs to, when it is in one
    positive: bool | None = None  # whether its label said Deformation (None: the label itself is unreadable)

    def __str__(self) -> str:
        if self.what == "annotation":
            return f"annotation uniqueID {self.key}: {self.reason}"
        series, _, uid = self.key.rpartition("/")
        return f"time series {series}: uniqueID {uid}: {self.reason}"

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe_left_out(items: Sequence[LeftOut]) -> str:
    """One line: how many annotations and series members were left out, why (per field or cause, most
    frequent first) and one example in full, e.g. `3 annotations left out of the index (field
    'activity_type' ×3); e.g. annotation uniqueID 17: field 'activity_type': unknown value(s) ['X']; ...`."""
    if not items:
        return "nothing left out of the index"
    counts = Counter(item.what for item in items)
    what = " and ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
    causes = Counter(re.split(r"[:;]", item.reason, maxsplit=1)[0] for item in items).most_common()
    shown = ", ".join(f"{cause} ×{n}" for cause, n in causes[:4]) + (", ..." if len(causes) > 4 else "")
    example = str(items[0])
    return f"{what} left out of the index ({shown}); e.g. {example[:200]}{'…' if len(example) > 200 else ''}"


class AnnotationSet(Mapping[int, Annotation]):
    """uniqueID → Annotation, plus the records left out while loading (malformed, skipped)."""

    def __init__(self, records: dict[int, Annotation], left_out: list[LeftOut] | None = None) -> None:
        self._records = records
        self.left_out: list[LeftOut] = left_out or []

    @property
    def problems(self) -> list[str]:
        """One line per record left out."""
        return [str(item) for item in self.left_out]

    def __getitem__(self, uid: int) -> Annotation:
        return self._records[uid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)


# ------------------------------------------------------------------------------ field checks
_DATE = re.compile(r"^\d{8}$")
# Allowed flag values. Most flags are binary; the published data also holds graded values:
# atmospheric_fringes 0-3 (none/stratified/turbulent/both), processing_error 0-3 (324 records
# have 3, 172 have 2) and glacier_fringes 0-2 (one record has 2).
FLAG_LEVELS: dict[str, tuple[int, ...]] = {
    **{name: (0, 1) for name in schema.FLAGS},
    "atmospheric_fringes": schema.ATMOSPHERIC_FRINGE_LEVELS,
    "processing_error": (0, 1, 2, 3),
    "glacier_fringes": (0, 1, 2),
}


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field, self.message = field, message


def _date(raw: dict[str, Any], field: str) -> str:
    value = raw.get(field)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _DATE.match(value):
        raise _FieldError(field, f"expected a YYYYMMDD date, got {excerpt(value)}")
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise _FieldError(field, f"{excerpt(value)} is not a calendar date") from None
    return value


def parse_uid(value: Any, field: str = "uniqueID") -> int:
    """An int-like uniqueID (int or digit string; not bool, not float)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _FieldError(field, f"expected an integer id, got {excerpt(value)}")
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise _FieldError(field, f"expected an integer id, got {excerpt(value)}")
        value = int(value)
    if value < 0:
        raise _FieldError(field, f"negative id {value}")
    return value


def _string(raw: dict[str, Any], field: str, allowed: tuple[str, ...] | None = None) -> str:
    value = raw.get(field)
    if not isinstance(value, str):
        raise _FieldError(field, f"expected a string, got {excerpt(value)}")
    if allowed is not None and value not in allowed:
        raise _FieldError(field, f"{excerpt(value)} is not one of {list(allowed)}")
    return value


def _vocab_list(raw: dict[str, Any], field: str, allowed: tuple[str, ...], non_empty: bool = False) -> tuple[str, ...]:
    value = raw.get(field)
    if not isinstance(value, list) or (non_empty and not value):
        raise _FieldError(field, f"expected a {'non-empty ' if non_empty else ''}list, got {excerpt(value)}")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise _FieldError(field, f"unknown value(s) {excerpt(unknown)}; allowed: {list(allowed)}")
    return tuple(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _polygons(raw: dict[str, Any], field: str = "segmentation_mask") -> tuple[tuple[float, ...], ...]:
    value = raw.get(field)
    if not isinstance(value, list):
        raise _FieldError(field, f"expected a list of polygons, got {type(value).__name__}")
    polygons = []
    for i, poly in enumerate(value):
        if not isinstance(poly, list) or len(poly) < 2 or len(poly) % 2:
            raise _FieldError(field, f"polygon {i} must be a flat list of x, y pairs (even length)")
        if not all(_number(v) for v in poly):
            raise _FieldError(field, f"polygon {i} holds non-numeric coordinates")
        polygons.append(tuple(float(v) for v in poly))
    return tuple(polygons)


def _flags(raw: dict[str, Any]) -> dict[str, int]:
    flags = {}
    for name in schema.FLAGS:
        value = raw.get(name)
        allowed = FLAG_LEVELS[name]
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise _FieldError(name, f"expected one of {list(allowed)}, got {excerpt(value)}")
        flags[name] = value
    return flags


def _confidence(raw: dict[str, Any]) -> float:
    value = raw.get("confidence")
    if not _number(value) or not 0.0 <= value <= 1.0:
        raise _FieldError("confidence", f"expected a number in [0, 1], got {excerpt(value)}")
    return float(value)


def parse_annotation(key: str | int, raw: Any) -> Annotation:
    """One published record → Annotation; raises AnnotationError naming the uniqueID and field."""
    try:
        return _parse(key, raw)
    except _FieldError as err:
        raise AnnotationError(f"annotation uniqueID {str(key)[:40]}: field {err.field!r}: {err.message}") from None


def _parse(key: str | int, raw: Any) -> Annotation:
    if not isinstance(raw, dict):
        raise _FieldError("(record)", f"expected an object, got {type(raw).__name__}")
    uid = parse_uid(raw.get("uniqueID"))
    if str(uid) != str(key).strip():
        raise _FieldError("uniqueID", f"{uid} does not match its key {excerpt(key, 40)}")
    labels = _vocab_list(raw, "label", schema.LABELS, non_empty=True)
    return Annotation(
        unique_id=uid,
        frame_id=_string(raw, "frameID"),
        primary_date=_date(raw, "primary_date"),
        secondary_date=_date(raw, "secondary_date"),
        labels=labels,
        positive=schema.NEGATIVE_LABEL not in labels,
        activity_types=_vocab_list(raw, "activity_type", schema.ACTIVITY_TYPES),
        intensity_levels=_vocab_list(raw, "intensity_level", schema.INTENSITY_LEVELS),
        phase=_string(raw, "phase", schema.PHASES),
        confidence=_confidence(raw),
        flags=_flags(raw),
        polygons=_polygons(raw),
        caption=_string(raw, "caption"),
    )


def _left_out(key: str | int, raw: Any, err: _FieldError) -> LeftOut:
    """A malformed record as left out, with what can still be read of it (frame, whether it was positive)."""
    fields = raw if isinstance(raw, dict) else {}
    labels = fields.get("label")
    positive = (schema.NEGATIVE_LABEL not in labels) if isinstance(labels, list) and labels else None
    frame = fields.get("frameID") if isinstance(fields.get("frameID"), str) else None
    return LeftOut("annotation", str(key)[:40], f"field {err.field!r}: {err.message}", frame_id=frame,
                   positive=positive)


# ---------------------------------------------------------------------------------- loading
def _raw_records(location: Location) -> dict[str, Any]:
    if location.is_dir():
        records = {}
        for item in location.glob("*.json"):
            records[item.name[: -len(".json")]] = item.read_json()
        return records
    raw = location.read_json()
    if not isinstance(raw, dict):
        raise AnnotationError(f"{location}: expected an object keyed by uniqueID, got {type(raw).__name__}")
    return raw


def load_annotations(
    location: str | Location, on_malformed: Literal["skip", "fail"] = "skip"
) -> AnnotationSet:
    """Read `annotations.json[.gz]` or a folder of `{uid}.json`; skip-and-report or fail on bad records."""
    loc = local(location)
    records: dict[int, Annotation] = {}
    left_out: list[LeftOut] = []
    for key, raw in _raw_records(loc).items():
        try:
            ann = _parse(key, raw)
        except _FieldError as err:
            skipped = _left_out(key, raw, err)
            if on_malformed == "fail":
                raise AnnotationError(f"{loc}: {skipped} (data.on_malformed_annotation: fail)") from None
            left_out.append(skipped)
            continue
        records[ann.unique_id] = ann
    return AnnotationSet(records, left_out)


def validate_timeseries(raw: Any, where: str = "quality_timeseries") -> dict[str, dict[str, dict[str, Any]]]:
    """Check the `{frame: {primary: {length, secondary_date[], uniqueID[]}}}` layout; normalise ids to int."""
    if not isinstance(raw, dict):
        raise AnnotationError(f"{where}: expected an object keyed by frame id")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for frame_id, groups in raw.items():
        if not isinstance(groups, dict):
            raise AnnotationError(f"{where}[{frame_id}]: expected an object keyed by primary date")
        out[frame_id] = {}
        for primary, group in groups.items():
            at = f"{where}[{frame_id}][{primary}]"
            try:
                _date({"primary_date": primary}, "primary_date")
                if not isinstance(group, dict):
                    raise _FieldError("(group)", "expected an object")
                secondaries = group.get("secondary_date")
                uids = group.get("uniqueID")
                if not isinstance(secondaries, list) or not isinstance(uids, list) or len(secondaries) != len(uids):
                    raise _FieldError("secondary_date/uniqueID", "expected two lists of equal length")
                dates = [_date({"secondary_date": s}, "secondary_date") for s in secondaries]
                ids = [parse_uid(u) for u in uids]
                if group.get("length", len(ids)) != len(ids):
                    raise _FieldError("length", f"{excerpt(group.get('length'))} but {len(ids)} members")
            except _FieldError as err:
                raise AnnotationError(f"{at}: field {err.field!r}: {err.message}") from None
            out[frame_id][primary] = {"length": len(ids), "secondary_date": dates, "uniqueID": ids}
    return out


def load_timeseries(location: str | Location) -> dict[str, dict[str, dict[str, Any]]]:
    """Read and validate `quality_timeseries.json`."""
    loc = local(location)
    return validate_timeseries(loc.read_json(), str(loc))


def _first_existing(candidates: list[Location]) -> Location | None:
    return next((c for c in candidates if c.exists()), None)


def find_metadata(root: str | Location) -> tuple[Location, Location, Location | None]:
    """(annotations, time-series index, statistics or None) under a dataset root or metadata folder."""
    base = local(root)
    folders = [base, base.join("annotations")]
    ann_names = [schema.ANNOTATIONS_FILE, schema.ANNOTATIONS_FILE + ".gz"]
    annotations = _first_existing([f.join(n) for f in folders for n in ann_names]) or _first_existing(
        [base.join("annotations")] if base.join("annotations").is_dir() else []
    )
    ts_names = [schema.TIMESERIES_FILE, schema.TIMESERIES_FILE + ".gz"]
    timeseries = _first_existing([f.join(n) for f in folders for n in ts_names])
    missing = [what for what, loc in (("annotations", annotations), ("time-series index", timeseries)) if loc is None]
    if missing:
        raise AnnotationError(
            f"{base}: no {' and no '.join(missing)} found (looked for {ann_names + ts_names} "
            f"in the root and in annotations/)"
        )
    statistics = _first_existing([f.join(schema.STATISTICS_FILE) for f in folders])
    return annotations, timeseries, statistics  # type: ignore[return-value]


def load_frame_names(root: str | Location) -> dict[str, list[str]]:
    """frame id → the volcano names of `{root}/frame_names.json` (as published: one comma-separated
    string per frame); {} when the dataset root has no such file (it is optional)."""
    loc = local(root).join(schema.FRAME_NAMES_FILE)
    if not loc.exists():
        return {}
    raw = loc.read_json()
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise AnnotationError(f"{loc}: expected {{frame_id: 'Volcano A, Volcano B'}}")
    return {frame: [n.strip() for n in names.split(",") if n.strip()] for frame, names in raw.items()}
