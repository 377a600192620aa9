"""The benchmark harness: interleaved repetitions, robust statistics, ratios against targets, records.

A comparison is only honest when both sides see the same machine state, so the project's path and its
baseline run in the same process, interleaved (A B, B A, A B, ...: the starting side rotates so that
neither always gets the warm caches), several times. Each side is summarised by its median and spread
(interquartile range and median absolute deviation); a ratio is the ratio of the medians, oriented so
that > 1 always means "the project's path is better", and is checked against the target that the
issue tracker set for it. A result is printed as a table and stored as JSON, with the machine it ran on,
under `{store}/bench/{suite}-{timestamp}.json`.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from thalia_ray.errors import ThaliaError
from thalia_ray.storage import Location
from thalia_ray.tables import Table, render


class SuiteUnavailable(ThaliaError, RuntimeError):
    """This suite cannot measure anything on this machine (e.g. the GPU suite without a GPU): neither the
    configuration nor the data is at fault, so it exits with the status of any other error."""


@dataclass(frozen=True)
class Rep:
    """One repetition of one workload: the measured `value` (a rate or a cost), its wall time, extras."""

    value: float
    wall_s: float
    extra: Mapping[str, float] = field(default_factory=dict)


Workload = Callable[[], Rep]


def timed_rate(fn: Callable[[], float]) -> Workload:
    """A workload whose value is items per second: `fn` does the work and returns how many items it did."""

    def run() -> Rep:
        start = time.perf_counter()
        items = fn()
        seconds = time.perf_counter() - start
        return Rep(items / seconds, seconds, {"items": float(items)})

    return run


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    q1: float
    q3: float
    iqr: float
    mad: float  # median absolute deviation from the median
    min: float
    max: float

    @property
    def rel_iqr(self) -> float:
        return self.iqr / abs(self.median) if self.median else float("nan")


def spread(values: Sequence[float]) -> Spread:
    """Median and spread of `values` (quartiles by linear interpolation; IQR 0 for a single value)."""
    if not values:
        raise ValueError("spread() needs at least one value")
    data = sorted(float(v) for v in values)
    med = statistics.median(data)
    q1, q3 = (statistics.quantiles(data, n=4, method="inclusive")[i] for i in (0, 2)) if len(data) > 1 else (med, med)
    mad = statistics.median(abs(v - med) for v in data)
    return Spread(len(data), med, q1, q3, q3 - q1, mad, data[0], data[-1])


@dataclass
class Series:
    """All repetitions of one workload. `higher_is_better` is True for rates, False for costs."""

    name: str
    unit: str
    reps: list[Rep]
    higher_is_better: bool = True

    @property
    def stats(self) -> Spread:
        return spread([r.value for r in self.reps])

    def extra_stats(self, key: str) -> Spread | None:
        values = [r.extra[key] for r in self.reps if key in r.extra]
        return spread(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "higher_is_better": self.higher_is_better,
                "stats": asdict(self.stats), "reps": [asdict(r) | {"extra": dict(r.extra)} for r in self.reps]}


@dataclass
class Ratio:
    """How many times better `project` is than `baseline` (ratio of medians; > 1 means better)."""

    name: str
    project: str
    baseline: str
    value: float
    target: float | None = None
    why: str = ""  # when the target is missed: the reason, as far as the suite can tell

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value >= self.target

    def verdict(self) -> str:
        if self.target is None:
            return "(no target)"
        if self.met:
            return f"meets ≥ {self.target:g}×"
        short = 100 * (1 - self.value / self.target)
        return f"MISSES ≥ {self.target:g}× by {short:.0f} %" + (f": {self.why}" if self.why else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "project": self.project, "baseline": self.baseline, "value": self.value,
                "target": self.target, "met": self.met, "why": self.why}


def ratio(name: str, project: Series, baseline: Series, target: float | None = None, why: str = "") -> Ratio:
    """Ratio of medians, oriented by the series' direction: rates divide project/baseline, costs the reverse."""
    if project.higher_is_better != baseline.higher_is_better:
        raise ValueError(f"ratio {name!r}: {project.name} and {baseline.name} measure opposite directions")
    p, b = project.stats.median, baseline.stats.median
    value = p / b if project.higher_is_better else b / p
    return Ratio(name, project.name, baseline.name, value, target, why)


def interleave(workloads: Mapping[str, Workload], repeats: int, warmup: int = 1) -> dict[str, list[Rep]]:
    """Run every workload `warmup` times (discarded) and `repeats` times, interleaved with a rotating start."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be ≥ 1 and warmup={warmup} ≥ 0")
    names = list(workloads)
    reps: dict[str, list[Rep]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            rep = workloads[name]()
            if i >= warmup:
                reps[name].append(rep)
    return reps


@dataclass
class BenchResult:
    """One suite's outcome: what ran, with which options, on which machine, and what it measured."""

    suite: str
    options: dict[str, Any]
    series: list[Series] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    seconds: float = 0.0
    figures: dict[str, bytes] = field(default_factory=dict)  # name → PNG, stored beside the record

    def add(self, name: str, unit: str, reps: Sequence[Rep], higher_is_better: bool = True) -> Series:
        series = Series(name, unit, list(reps), higher_is_better)
        self.series.append(series)
        return series

    def to_json(self) -> dict[str, Any]:
        return {"suite": self.suite, "started": self.started, "seconds": self.seconds, "options": self.options,
                "machine": self.machine, "series": [s.to_json() for s in self.series],
                "ratios": [r.to_json() for r in self.ratios], "notes": list(self.notes),
                "figures": sorted(self.figures)}

    def table(self) -> str:
        return render_table(self)


def render_table(result: BenchResult) -> str:
    """A plain-text table: one line per series (median, IQR, MAD, n), then the ratios and notes."""
    machine = result.machine
    title = (f"bench {result.suite}  ({result.started}, {result.seconds:.0f} s, {machine.get('cpu_count', '?')} CPUs, "
             f"GPUs: {', '.join(machine.get('gpus') or []) or 'none'})")
    table = Table(["series", "unit", "median", "IQR", "MAD", "n"],
                  [[s.name, s.unit, s.stats.median, s.stats.iqr, s.stats.mad, s.stats.n] for s in result.series], title)
    lines = [render(table, "terminal")]
    lines += [f"ratio {r.name}: {r.value:.2f}× ({r.project} vs {r.baseline})  {r.verdict()}" for r in result.ratios]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def record_location(store_root: Location, suite: str, started: str) -> Location:
    """`{store}/bench/{suite}-{YYYYmmddTHHMMSSZ}.json`: sortable by time, no characters that need quoting."""
    stamp = started.replace("-", "").replace(":", "")
    return store_root.join("bench", f"{suite}-{stamp}.json")


def write_record(result: BenchResult, store: str | Location) -> Location:
    """Store the result as JSON in the experiment store (a Location, or a local folder), and each of its figures
    beside it as `{record stem}-{name}.png`; returns where the record went."""
    from thalia_ray.store import ExperimentStore

    loc = record_location(ExperimentStore(store).root, result.suite, result.started)
    loc.write_json(result.to_json())
    for name, data in result.figures.items():
        figure_location(loc, name).write_bytes(data)
    return loc


def figure_location(record: Location, name: str) -> Location:
    return record.parent().join(f"{record.name.removesuffix('.json')}-{name}.png")
