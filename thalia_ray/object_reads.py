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
  full jitter (longer for throttling), up to `attempts` times and within `storage.timeout_s` in all;
  anything else (missing object, denied access) is raised at once.

The client is obstore (Rust's `object_store`, the S3 client of Zarr's `ObjectStore`): measured here
against a local S3 server, a GET cost 1.13 ms of this process's CPU through s3fs/aiobotocore and
0.19 ms through obstore (BENCHMARKS.md, issue 27). From a bucket the reader's CPU per request, not the
bucket, limited the rate. Credentials come from botocore's usual chain (environment, profile, instance
role), so they are found exactly as for the rest of the service's S3 access.
"""
from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import obstore
import obstore.exceptions

from thalia_ray.node_cache import CorruptEntry, node_cache
from thalia_ray.storage import S3Options, StorageError, s3_filesystem
from thalia_ray.traffic import TRAFFIC

THROTTLE_BASE_S = 0.25  # first back-off after a 503 SlowDown (doubles per attempt, capped)
RETRY_BASE_S = 0.05  # first back-off after a reset or a stall
BACKOFF_CAP_S = 5.0
_THROTTLE_CODES = ("SlowDown", "TooManyRequests", "RequestLimitExceeded", "Throttling")
# How obstore words a failure that did not come from the object: a connection that dropped or never
# answered (its message carries the HTTP client's own error text)
_RESET_TEXT = ("error sending request", "connection closed", "connection reset", "broken pipe", "connection error",
               "error reading a body", "incompletemessage", "unexpected eof", "connection refused", "hyper")
_STATUS = re.compile(r"\b(429|5\d\d)\b")


def failure_kind(err: BaseException) -> str | None:
    """"throttle", "timeout", "reset" for a transient failure of one request, None for a final one."""
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if not isinstance(err, obstore.exceptions.GenericError):
        return None  # not found, denied, bad configuration: final
    text = str(err).split("\n", 1)[0]  # obstore's message; a debug dump of its settings follows
    if "timed out" in text.lower():
        return "timeout"
    status = _STATUS.search(text) if "status" in text.lower() else None
    if any(code in text for code in _THROTTLE_CODES) or (status is not None and status.group(1) in ("503", "429")):
        return "throttle"
    if status is not None or any(t in text.lower() for t in _RESET_TEXT):
        return "reset"
    return None


def backoff_s(kind: str, attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential back-off before attempt `attempt + 1`."""
    base = THROTTLE_BASE_S if kind == "throttle" else RETRY_BASE_S
    return rng.uniform(0, min(BACKOFF_CAP_S, base * 2 ** attempt))


class ObjectReader:
    """Counted, cached, retried GETs against one S3 endpoint (see the module docstring)."""

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self.settings = options.reads
        self.cache = node_cache(self.settings.cache) if self.settings.cache is not None else None
        self._stores: dict[str, Any] = {}  # bucket -> obstore S3Store
        self._ranges_by_s3fs = False  # the server answers ranges without 206 (see _get)
        self._fs: Any = None
        self._gates: dict[int, asyncio.Semaphore] = {}
        self._rng = random.Random()

    def _store(self, bucket: str) -> Any:
        if bucket not in self._stores:
            self._stores[bucket] = bucket_store(self.options, bucket)
        return self._stores[bucket]

    def _gate(self) -> asyncio.Semaphore:
        loop = id(asyncio.get_running_loop())
        if loop not in self._gates:
            self._gates[loop] = asyncio.Semaphore(self.settings.in_flight)
        return self._gates[loop]

    async def get(self, path: str, start: int | None = None, end: int | None = None, generation: str | None = "") -> Any:
        """The object at `path` (bucket/key), or bytes `start` to `end` (exclusive) of it.

        `generation` names the object's version in the cache key (an ETag, a digest), so that a
        rewritten object is not answered from an old entry; None: never cached (metadata that says
        what the current generation is)."""
        key = f"{self.options.endpoint_url}|{path}|{start}-{end}|{generation}"
        if generation is None:
            return await self._fetch(path, start, end)
        if self.cache is not None:
            try:
                hit = self.cache.get(key)
                if hit is None and start is not None and generation:  # a range of an object kept whole
                    hit = self.cache.get_range(f"{self.options.endpoint_url}|{path}|None-None|{generation}", start, end)
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

    async def _get(self, path: str, start: int | None, end: int | None) -> Any:
        """One GET (whole object, or bytes start..end), as obstore returns it (a buffer)."""
        bucket, _, key = path.partition("/")
        store = self._store(bucket)
        try:
            if start is None:
                return await (await obstore.get_async(store, key)).bytes_async()
            if not self._ranges_by_s3fs:
                options = {"range": {"offset": start} if end is None else (start, end)}
                return await (await obstore.get_async(store, key, options=options)).bytes_async()
        except obstore.exceptions.NotFoundError as err:
            raise FileNotFoundError(f"s3://{path}: not found") from err
        except obstore.exceptions.GenericError as err:
            if "NotPartial" not in str(err):
                raise
            self._ranges_by_s3fs = True  # e.g. `rclone serve s3` answers a range with 200, not 206
        return await self._s3fs()._cat_file(path, start=start, end=end)

    def _s3fs(self) -> Any:
        """s3fs without retries, for ranged reads from servers that obstore refuses (see `_get`)."""
        if self._fs is None:
            self._fs = s3_filesystem(self.options, asynchronous=True, client_retries=False)
        return self._fs

    async def _fetch(self, path: str, start: int | None, end: int | None) -> Any:
        """One object or range, retried as the module docstring says, all within `storage.timeout_s`."""
        attempts, deadline = self.settings.attempts, time.monotonic() + self.options.timeout_s
        where = f"s3://{path} (endpoint {self.options.endpoint_url})"
        for attempt in range(attempts):
            async with self._gate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageError(f"cannot read {where}: no answer within {self.options.timeout_s:g} s "
                                       f"(storage.timeout_s) after {attempt} attempts")
                TRAFFIC.add(requests=1)
                try:
                    data = await asyncio.wait_for(self._get(path, start, end), min(self.settings.request_timeout_s, left))
                except Exception as err:  # noqa: BLE001 - classified below; final ones are raised
                    kind = failure_kind(err)
                    if kind is None:
                        raise
                    TRAFFIC.add(**{_COUNTER[kind]: 1})
                    if attempt + 1 == attempts:
                        raise StorageError(f"cannot read {where}: {attempts} attempts failed, the last {kind} "
                                           f"[{type(err).__name__}: {err}]") from err
                    last_kind = kind
                else:
                    TRAFFIC.add(bytes=len(data))
                    return data
            TRAFFIC.add(retries=1)
            await asyncio.sleep(min(backoff_s(last_kind, attempt, self._rng), max(0.0, deadline - time.monotonic())))
        raise AssertionError("unreachable")


_COUNTER = {"throttle": "throttles", "timeout": "timeouts", "reset": "resets"}


def bucket_store(options: S3Options, bucket: str) -> Any:
    """An obstore S3Store for one bucket: the location's endpoint and region, no retries of its own,
    credentials from botocore's chain (refreshed when they expire)."""
    from obstore.store import S3Store

    endpoint = options.endpoint_url
    # the client's own deadline a little past ours, so that a stall ends in our wait_for and counts as one
    client = {"timeout": timedelta(seconds=options.reads.request_timeout_s + 2.0),
              "connect_timeout": timedelta(seconds=min(5.0, options.reads.request_timeout_s)),
              "allow_http": bool(endpoint and urlsplit(endpoint).scheme == "http"),
              "pool_max_idle_per_host": str(options.reads.in_flight)}
    retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=options.reads.request_timeout_s),
             "backoff": {"init_backoff": timedelta(seconds=RETRY_BASE_S), "max_backoff": timedelta(seconds=1),
                         "base": 2.0}}
    return S3Store(bucket, endpoint=endpoint, region=options.region or "us-east-1", virtual_hosted_style_request=False,
                   client_options=client, retry_config=retry, credential_provider=_botocore_credentials)


def _botocore_credentials() -> dict[str, Any]:
    """The credentials botocore finds (environment, shared profile, instance role), in obstore's shape."""
    import botocore.session

    found = botocore.session.get_session().get_credentials()
    if found is None:
        raise StorageError("no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    frozen = found.get_frozen_credentials()
    expiry = getattr(found, "_expiry_time", None)
    return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
            "expires_at": expiry if expiry is not None else datetime.now(timezone.utc) + timedelta(hours=1)}


@functools.lru_cache(maxsize=16)
def object_reader(options: S3Options) -> ObjectReader:
    """This process's reader for an endpoint and its read settings."""
    return ObjectReader(options)


__all__ = ["ObjectReader", "backoff_s", "failure_kind", "object_reader"]
