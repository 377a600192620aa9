"""Several samples read at once by one reader, delivered in order, with a bounded number in flight.

From object storage a sample's read is one round trip of concurrent GETs; a reader that waited for
each sample before starting the next would run at one sample per round trip whatever its CPU. Reading
`depth` samples at once (threads that wait on the process's one event loop, which sends every GET)
keeps `depth` round trips in flight; memory stays bounded by `depth` samples. Local disk gains nothing
from it (reads there are CPU, not waiting), so local locations read one sample at a time as before.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from thalia_ray.storage import Location

In = TypeVar("In")
Out = TypeVar("Out")

REQUESTS_PER_SAMPLE = 8  # a conservative guess: samples in flight = requests in flight / this
SAMPLE_MEMORY = 256 * 2**20  # bytes the samples in flight of one reader may hold


def samples_in_flight(location: Location, sample_bytes: int) -> int:
    """How many samples a reader of `location` reads at once: 1 locally; from object storage enough
    to keep `storage.requests_in_flight` requests busy, within SAMPLE_MEMORY."""
    if location.protocol == "file":
        return 1
    by_requests = max(1, location.s3.reads.in_flight // REQUESTS_PER_SAMPLE)
    return max(1, min(by_requests, SAMPLE_MEMORY // max(1, sample_bytes)))


def read_ahead(read: Callable[[In], Out], items: Iterable[In], depth: int) -> Iterator[Out]:
    """`read(item)` for each item, in order, at most `depth` running at once (`read` must not raise)."""
    if depth <= 1:
        yield from map(read, items)
        return
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="thalia-read-ahead") as pool:
        pending: deque[Future[Out]] = deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
