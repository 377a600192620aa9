"""Object-storage traffic: what a process sent to its bucket and what its node-local cache saved.

Every GET that the data path sends to object storage is counted where it is sent (`object_reads`),
per process, in one `TRAFFIC` meter: each attempt is a request (a retried request is billed again),
with the bytes that came back, and each answer the cache gave instead. Read tasks report the change
in their process's meter to the run's epoch-control actor, which sums it per epoch; the loop writes
those sums into the run's history (`storage/...` columns), and `runs show` and the report price
the requests at `storage.request_price_per_1000`.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

PREFIX = "storage/"
DEFAULT_REQUEST_PRICE = 0.0004  # per 1,000 GETs: AWS S3 Standard's published GET price (USD)


@dataclass(frozen=True)
class Traffic:
    """Counts of storage traffic (one process's so far, or the difference over one read task)."""

    requests: int = 0  # GETs sent, every attempt included
    bytes: int = 0  # bytes those requests returned
    cache_hits: int = 0  # reads the node-local cache answered
    cache_bytes: int = 0
    cache_corrupt: int = 0  # cache entries that failed their integrity check (refetched)
    retries: int = 0  # requests sent again after a transient failure
    throttles: int = 0  # answers 503 SlowDown / 429 (each retried after a back-off)
    resets: int = 0  # connections dropped mid-request
    timeouts: int = 0  # requests that stalled past `storage.request_timeout_s`

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def metrics(self) -> dict[str, int]:
        """History columns: `storage/requests`, `storage/bytes`, ..."""
        return {f"{PREFIX}{name}": value for name, value in asdict(self).items()}

    @classmethod
    def from_metrics(cls, row: Mapping[str, Any]) -> "Traffic":
        """The counts in a history row (0 where a column is absent)."""
        return cls(*(int(row.get(f"{PREFIX}{f.name}", 0) or 0) for f in fields(cls)))

    @classmethod
    def total(cls, rows: Iterable[Mapping[str, Any]]) -> "Traffic":
        out = cls()
        for row in rows:
            out += cls.from_metrics(row)
        return out


def request_cost(requests: int, price_per_1000: float) -> float:
    """What `requests` GETs cost at `price_per_1000` (currency units per 1,000 requests)."""
    return requests * price_per_1000 / 1000


def describe(traffic: Traffic, samples: int | None = None, price_per_1000: float | None = None) -> str:
    """One line: requests, bytes, cache hits, retries and throttles (per sample and priced when given)."""
    per = f" ({traffic.requests / samples:.1f}/sample)" if samples else ""
    cost = f", ≈{request_cost(traffic.requests, price_per_1000):.4g} at {price_per_1000:g}/1000 GET" \
        if price_per_1000 is not None else ""
    return (f"{traffic.requests:,} GET{per}, {traffic.bytes / 2**20:,.1f} MiB, {traffic.cache_hits:,} cache hits "
            f"({traffic.cache_bytes / 2**20:,.1f} MiB), {traffic.retries} retries ({traffic.throttles} throttled, "
            f"{traffic.resets} reset, {traffic.timeouts} timed out){cost}")


def epoch_samples(row: Mapping[str, Any]) -> int | None:
    """Samples an epoch of a run's history trained and validated (its rate × its seconds)."""
    rate, seconds = row.get("time/samples_per_s"), row.get("time/epoch_s")
    return round(rate * seconds) if isinstance(rate, (int, float)) and isinstance(seconds, (int, float)) else None


def history_lines(history: Sequence[Mapping[str, Any]], price_per_1000: float) -> list[str]:
    """`runs show`'s storage section: the run's totals with their cost, then one line per epoch; empty for
    a run that read nothing from object storage."""
    rows = [row for row in history if Traffic.from_metrics(row)]
    if not rows:
        return []
    samples = [epoch_samples(row) for row in rows]
    total = sum(s for s in samples if s) if all(samples) else None
    lines = [f"storage   {describe(Traffic.total(rows), total, price_per_1000)}"]
    for row, n in zip(rows, samples):
        lines.append(f"  epoch {int(row.get('epoch', 0)):<3} {describe(Traffic.from_metrics(row), n)}")
    return lines


class Meter:
    """A process's running totals (thread-safe: reads run on Zarr's event-loop thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {f.name: 0 for f in fields(Traffic)}

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += value

    def snapshot(self) -> Traffic:
        with self._lock:
            return Traffic(**self._counts)


TRAFFIC = Meter()

__all__ = ["DEFAULT_REQUEST_PRICE", "PREFIX", "TRAFFIC", "Meter", "Traffic", "describe", "epoch_samples", "history_lines", "request_cost"]
