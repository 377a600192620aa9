"""GETs of the data path against object storage: counted, cached on the node, retried honestly, many at once.

Training reads many small objects (Zarr chunks) and byte ranges (shard members). Every one goes
through `ObjectReader.get`, which

- answers from the node-local cache when the location's read settings enable it (`node_cache`), and
  stores what it fetches there;
- keeps up to `in_flight` requests of its process in flight at once (one semaphore per process, on
  Zarr's event loop, which runs every read of the process): enough to hide a bucket's latency whatever
  CPUs the reader holds, while the callers bound how many samples wait on them;
- sends each request itself, with the S3 client's own retries switched off, so that every attempt is
  seen: a `503 SlowDown`/429 answer, a dropped connection or a request stalled past
  `request_timeout_s` is counted (`traffic.TRAFFIC`) and retried after an exponential back-off with
  full jitter (longer for throttling), up to `attempts` times; anything else (missing object, denied
  access) is raised at once.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import random
from dataclasses import dataclass
from typing import Any

from thalia_ray.node_cache import CorruptEntry, node_cache
from thalia_ray.storage import S3Options, StorageError, s3_filesystem
from thalia_ray.traffic import TRAFFIC

THROTTLE_BASE_S = 0.25  # first back-off after a 503 SlowDown (doubles per attempt, capped)
RETRY_BASE_S = 0.05  # first back-off after a reset or a stall
BACKOFF_CAP_S = 5.0
_THROTTLE_TEXT = ("SlowDown", "TooManyRequests", "reduce your request rate", "503", "429")
_RESET_NAMES = ("ConnectionClosedError", "EndpointConnectionError", "HTTPClientError", "ClientOSError",
                "ServerDisconnectedError", "ClientPayloadError", "IncompleteRead", "ResponseParserError",
                "ClientConnectorError", "ProxyConnectionError", "ConnectionResetError", "ReadTimeoutError")


def failure_kind(err: BaseException) -> str | None:
    """"throttle", "timeout", "reset" for a transient failure of one request, None for a final one."""
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    chain = [err, *_causes(err)]
    if any(isinstance(e, OSError) and e.errno == errno.EBUSY for e in chain) or \
            any(t in str(e) for e in chain for t in _THROTTLE_TEXT if not isinstance(e, FileNotFoundError)):
        return "throttle"
    if any(isinstance(e, ConnectionError) or type(e).__name__ in _RESET_NAMES for e in chain):
        return "reset"
    return None


def _causes(err: BaseException) -> list[BaseException]:
    out, seen = [], {id(err)}
    while (err := err.__cause__ or err.__context__) is not None and id(err) not in seen:  # type: ignore[assignment]
        seen.add(id(err))
        out.append(err)
    return out


def backoff_s(kind: str, attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential back-off before attempt `attempt + 1`."""
    base = THROTTLE_BASE_S if kind == "throttle" else RETRY_BASE_S
    return rng.uniform(0, min(BACKOFF_CAP_S, base * 2 ** attempt))


class ObjectReader:
    """Counted, cached, retried GETs against one S3 endpoint (see the module docstring)."""

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self.settings = options.reads
        self.fs = s3_filesystem(options, asynchronous=True, client_retries=False)
        self.cache = node_cache(self.settings.cache) if self.settings.cache is not None else None
        self._gates: dict[int, asyncio.Semaphore] = {}
        self._rng = random.Random()

    def _gate(self) -> asyncio.Semaphore:
        loop = id(asyncio.get_running_loop())
        if loop not in self._gates:
            self._gates[loop] = asyncio.Semaphore(self.settings.in_flight)
        return self._gates[loop]

    async def get(self, path: str, start: int | None = None, end: int | None = None, generation: str = "") -> Any:
        """The object at `path` (bucket/key), or bytes `start` to `end` (exclusive) of it.

        `generation` names the object's version in the cache key (an ETag, a digest), so that a
        rewritten object is not answered from an old entry."""
        key = f"{self.options.endpoint_url}|{path}|{start}-{end}|{generation}"
        if self.cache is not None:
            try:
                hit = self.cache.get(key)
            except CorruptEntry:
                TRAFFIC.add(cache_corrupt=1)
                hit = None
            if hit is not None:
                TRAFFIC.add(cache_hits=1, cache_bytes=len(hit))
                return hit
        data = await self._fetch(path, start, end)
        if self.cache is not None:
            self.cache.put(key, data)
        return data

    async def _fetch(self, path: str, start: int | None, end: int | None) -> bytes:
        attempts = self.settings.attempts
        for attempt in range(attempts):
            async with self._gate():
                TRAFFIC.add(requests=1)
                try:
                    data = await asyncio.wait_for(self.fs._cat_file(path, start=start, end=end),
                                                  self.settings.request_timeout_s)
                except Exception as err:  # noqa: BLE001 - classified below; final ones are raised
                    kind = failure_kind(err)
                    if kind is None:
                        raise
                    TRAFFIC.add(**{_COUNTER[kind]: 1})
                    if attempt + 1 == attempts:
                        raise StorageError(f"cannot read s3://{path} (endpoint {self.options.endpoint_url}): "
                                           f"{attempts} attempts failed, the last {kind} [{type(err).__name__}: {err}]"
                                           ) from err
                    last_kind = kind
                else:
                    TRAFFIC.add(bytes=len(data))
                    return data
            TRAFFIC.add(retries=1)
            await asyncio.sleep(backoff_s(last_kind, attempt, self._rng))
        raise AssertionError("unreachable")


_COUNTER = {"throttle": "throttles", "timeout": "timeouts", "reset": "resets"}


@functools.lru_cache(maxsize=16)
def object_reader(options: S3Options) -> ObjectReader:
    """This process's reader for an endpoint and its read settings."""
    return ObjectReader(options)


__all__ = ["ObjectReader", "backoff_s", "failure_kind", "object_reader"]
