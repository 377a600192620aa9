"""Locations → filesystems. Everything that touches storage goes through here.

A location is a local path, a `file://` URL or `s3://bucket/prefix` on any S3-compatible endpoint.
It yields an fsspec filesystem (s3fs for S3) for our own I/O and Zarr, and a pyarrow filesystem for
Ray's `storage_filesystem`. The endpoint comes from the config, `?endpoint_override=` on the URL, or
`AWS_ENDPOINT_URL`; credentials only from the environment or the standard AWS configuration.
Writes are atomic (write a temporary sibling, then rename/copy into place), so a reader never sees a
half-written file, and transient errors are retried with backoff. Every S3 call ends within the
configured `storage.timeout_s`, retries included: the S3 clients get connect/read timeouts that fit
inside it, and each of our calls runs under a deadline, so an endpoint that accepts connections but
never answers gives a StorageError instead of a hang.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar
from urllib.parse import parse_qs, urlsplit

import fsspec

from thalia_ray.errors import StorageProblem
from thalia_ray.node_cache import CacheSettings

if TYPE_CHECKING:  # the settings are built from it; storage sits below the configuration
    from thalia_ray.config import StorageConfig

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 60.0  # StorageConfig.timeout_s

# Errors worth retrying: timeouts and dropped connections, not missing keys or denied access.
# botocore's own connection errors (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)
# are left out on purpose: the S3 client has already retried them with backoff, and retrying them
# again here multiplied the wait on an unreachable endpoint to over 10 s.
_TRANSIENT = (ConnectionError, TimeoutError)
_TRANSIENT_NAMES = ("ServerDisconnectedError", "ClientOSError", "SlowDown", "ServiceUnavailable")


class StorageError(StorageProblem):
    """A storage operation failed; the message names the location and the likely cause."""


@dataclass(frozen=True)
class ReadSettings:
    """How the data path reads objects (`object_reads`): requests in flight per process, one request's
    deadline and attempts, and the node-local cache (None: off). From `storage.*` of the config."""

    in_flight: int = 64
    request_timeout_s: float = 10.0
    attempts: int = 8
    cache: CacheSettings | None = None

    @classmethod
    def of(cls, storage_cfg: "StorageConfig") -> "ReadSettings":
        """The settings in a StorageConfig."""
        cache = storage_cfg.cache
        return cls(storage_cfg.requests_in_flight, storage_cfg.request_timeout_s, storage_cfg.request_attempts,
                   CacheSettings(cache.path, int(cache.max_gb * 2**30)) if cache.enabled else None)


@dataclass(frozen=True)
class S3Options:
    """The storage settings, resolved once (`of` a configuration's `storage` section, or
    `from_environment`) and carried by every Location: endpoint, region, the deadline of one call and the
    data path's read settings. A URL's `?endpoint_override=`/`?region=` refine them for that location."""

    endpoint_url: str | None = None
    region: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S  # the longest any one storage call may take, retries included
    reads: ReadSettings = field(default_factory=ReadSettings)  # the data path's GETs (object_reads)

    @classmethod
    def of(cls, storage_cfg: "StorageConfig") -> "S3Options":
        """A configuration's settings; an endpoint or region it leaves unset comes from the environment."""
        return cls(_endpoint(storage_cfg.endpoint_url), storage_cfg.region or _environment_region(),
                   storage_cfg.timeout_s, ReadSettings.of(storage_cfg))

    @classmethod
    def from_environment(cls) -> "S3Options":
        """The settings of a process given no configuration: AWS_ENDPOINT_URL(_S3), AWS_(DEFAULT_)REGION."""
        return cls(_endpoint(None), _environment_region())

    def for_url(self, query: dict[str, list[str]]) -> "S3Options":
        """These settings, with the endpoint or region a location's URL names in its query."""
        endpoint = query.get("endpoint_override", [None])[0]
        if endpoint and "://" not in endpoint:
            endpoint = f"{query.get('scheme', ['https'])[0]}://{endpoint}"
        region = query.get("region", [None])[0]
        return replace(self, endpoint_url=_endpoint(endpoint) if endpoint else self.endpoint_url,
                       region=region or self.region)

    @property
    def attempt_timeout_s(self) -> float:
        """Connect/read timeout of one request: two client attempts, each retried once by s3fs, fit
        in `timeout_s` (a read timeout is a stall without bytes, not a limit on a long transfer)."""
        return max(self.timeout_s / 4, 0.5)


def _endpoint(configured: str | None) -> str | None:
    endpoint = configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint.rstrip("/") if endpoint else None


def _environment_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def _client_config(options: S3Options, client_retries: bool = True) -> dict[str, Any]:
    attempt = options.attempt_timeout_s
    return {"connect_timeout": min(5.0, attempt), "read_timeout": attempt,
            # botocore's max_attempts counts retries, not attempts: 0 means one attempt, no retry
            "retries": {"max_attempts": 2 if client_retries else 0, "mode": "standard"},
            "max_pool_connections": max(10, options.reads.in_flight)}


def _client_kwargs(options: S3Options) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    if options.region:
        kwargs["region_name"] = options.region
    return kwargs


def s3_filesystem(options: S3Options, asynchronous: bool, client_retries: bool = True) -> fsspec.AbstractFileSystem:
    """A new s3fs filesystem for `options`. `client_retries=False`: one attempt per call, neither the
    S3 client nor s3fs retrying, for callers that retry and count themselves (`object_reads`)."""
    import s3fs

    fs = s3fs.S3FileSystem(asynchronous=asynchronous, client_kwargs=_client_kwargs(options),
                           config_kwargs=_client_config(options, client_retries), skip_instance_cache=True)
    fs.retries = 2 if client_retries else 1  # s3fs's own retry loop, around the client's attempts (default 5)
    if not asynchronous:
        fs.close_session = _close_on_its_loop  # found by s3fs's finalizer (self.close_session) before its own
    return fs


def _close_on_its_loop(loop: asyncio.AbstractEventLoop | None, client: Any) -> None:
    """Close a collected sync s3fs filesystem's S3 client on the event loop its connections belong to.

    s3fs's own finalizer starts the close on whichever loop runs in the thread that collects the
    filesystem: in a reader that is often Zarr's, where closing the connections fails ("attached to a
    different loop") and asyncio logs "Task exception was never retrieved". Nothing waits for the close
    (a finalizer must not block), and a failure of it is of no use to anyone, so it is not reported."""
    if loop is not None and loop.is_running():
        asyncio.run_coroutine_threadsafe(client.__aexit__(None, None, None), loop)


@functools.lru_cache(maxsize=16)
def _s3fs(options: S3Options) -> fsspec.AbstractFileSystem:
    return s3_filesystem(options, asynchronous=False)


@dataclass(frozen=True)
class Location:
    """A resolved place in storage: `protocol` is "file" or "s3"; `path` is what the fs expects."""

    url: str
    protocol: str
    path: str
    s3: S3Options  # the storage settings it was resolved with (used when `protocol` is "s3")

    # ---------------------------------------------------------------------- filesystems
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self.protocol == "s3":
            return _s3fs(self.s3)
        return fsspec.filesystem("file")

    def pyarrow(self) -> tuple[Any, str]:
        """(pyarrow filesystem, path) for Ray Train/Tune `storage_filesystem` / `storage_path`."""
        import pyarrow.fs as pafs

        if self.protocol == "file":
            # Ray writes its run snapshot in place; this one replaces it only with a complete file.
            from thalia_ray.atomic_arrow import AtomicLocalFileSystem

            return AtomicLocalFileSystem(), self.path
        kwargs: dict[str, Any] = {}
        if self.s3.endpoint_url:
            parts = urlsplit(self.s3.endpoint_url)
            kwargs["endpoint_override"] = parts.netloc
            kwargs["scheme"] = parts.scheme or "https"
        if self.s3.region:
            kwargs["region"] = self.s3.region
        attempt = self.s3.attempt_timeout_s
        kwargs.update(connect_timeout=min(5.0, attempt), request_timeout=attempt,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
        # No keys here: the filesystem is pickled to Ray workers (and into Ray's own state files), so
        # each process finds its credentials itself (environment, profile, instance role).
        return pafs.S3FileSystem(**kwargs), self.path

    def zarr_store(self, read_only: bool = True) -> Any:
        """A Zarr v3 store over this location (local directory or S3 prefix)."""
        import zarr.storage

        if self.protocol == "file":
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        return zarr.storage.FsspecStore(_async_s3fs(self.s3), path=self.path, read_only=read_only)

    # ---------------------------------------------------------------------- navigation
    def join(self, *parts: str) -> "Location":
        tail = "/".join(p.strip("/") for p in parts if p)
        if not tail:
            return self
        base_url = self.url.split("?", 1)[0].rstrip("/")
        return Location(f"{base_url}/{tail}", self.protocol, f"{self.path.rstrip('/')}/{tail}", self.s3)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    # ---------------------------------------------------------------------- reading
    def exists(self) -> bool:
        return self._call("check", lambda: self.fs.exists(self.path))

    def is_dir(self) -> bool:
        return self._call("check", lambda: self.fs.isdir(self.path))

    def list(self) -> list[str]:
        """Names (not paths) directly under this location, sorted; empty if it does not exist."""
        def names() -> list[str]:
            if not self.fs.exists(self.path):
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))

        self.invalidate()
        return self._call("list", names)

    def glob(self, pattern: str) -> list["Location"]:
        matches = self._call("list", lambda: sorted(self.fs.glob(f"{self.path.rstrip('/')}/{pattern}")))
        root = self.path.rstrip("/")
        return [self.join(m[len(root) + 1:]) for m in matches]

    def read_bytes(self) -> bytes:
        return self._call("read", lambda: self.fs.cat_file(self.path))

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes `start` to `end` (exclusive): one ranged GET on S3."""
        return self._call("read", lambda: self.fs.cat_file(self.path, start=start, end=end))

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        data = self.read_bytes()
        if self.path.endswith(".gz"):
            import gzip

            data = gzip.decompress(data)
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            raise StorageError(f"{self.url}: not valid JSON ({err})") from None

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode and self.protocol == "file":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return self._call("open", lambda: self.fs.open(self.path, mode, **kwargs))

    def size(self) -> int:
        return int(self._call("stat", lambda: self.fs.size(self.path)))

    def info(self) -> dict[str, Any]:
        """The object's details as the filesystem reports them (size; on S3 also ETag and LastModified)."""
        return dict(self._call("stat", lambda: self.fs.info(self.path)))

    # ---------------------------------------------------------------------- writing
    def write_bytes(self, data: bytes) -> None:
        """Atomic write: a temporary sibling is written whole, then moved into place."""
        if self.protocol == "file":
            with writing_to(self.url):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                with _local_temp_sibling(self.path) as tmp:
                    with open(tmp, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(tmp, self.path)
            return
        # S3 PUTs are atomic per object: a reader sees the old object or the new one, never a part.
        self._call("write", lambda: self.fs.pipe_file(self.path, data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any, indent: int | None = 2) -> None:
        self.write_text(json.dumps(obj, indent=indent, default=str) + "\n")

    def put_file(self, local_path: str | Path) -> None:
        """Upload a finished local file as this location, atomically."""
        if self.protocol == "file":
            with writing_to(self.url):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                with _local_temp_sibling(self.path) as tmp:
                    shutil.copyfile(local_path, tmp)
                    os.replace(tmp, self.path)
            return
        self._call("upload", lambda: self.fs.put_file(str(local_path), self.path))

    def makedirs(self) -> None:
        if self.protocol == "file":
            Path(self.path).mkdir(parents=True, exist_ok=True)

    def remove(self, recursive: bool = False) -> None:
        if self.exists():
            self._call("remove", lambda: self.fs.rm(self.path, recursive=recursive))

    def parent(self) -> "Location":
        parent_path = self.path.rstrip("/").rsplit("/", 1)[0]
        base_url = self.url.split("?", 1)[0].rstrip("/")
        return Location(base_url.rsplit("/", 1)[0], self.protocol, parent_path, self.s3)

    def invalidate(self) -> None:
        """Forget cached listings (s3fs caches directory listings per instance)."""
        if self.protocol == "s3":
            self.fs.invalidate_cache(self.path)

    # ---------------------------------------------------------------------- errors
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self.protocol != "s3":
            return with_retries(fn, f"{what} {self.url}")
        endpoint, deadline = self.s3.endpoint_url, time.monotonic() + self.s3.timeout_s
        return within_deadline(lambda: with_retries(fn, f"{what} {self.url}", endpoint=endpoint, deadline=deadline),
                               self.s3.timeout_s, f"{what} {self.url}", endpoint)


@contextlib.contextmanager
def writing_to(url: str) -> Iterator[None]:
    """A failed local write under `url` (full disk, read-only or missing folder, no permission) as a
    StorageError that names where: the OS's own message often carries no path."""
    try:
        yield
    except OSError as err:
        raise StorageError(f"cannot write {url}: {err.strerror or err}") from err


@contextlib.contextmanager
def _local_temp_sibling(path: str) -> Iterator[str]:
    """A hidden temporary name next to `path`, removed if the write fails before it is renamed."""
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@functools.lru_cache(maxsize=16)
def _async_s3fs(options: S3Options) -> Any:
    return s3_filesystem(options, asynchronous=True)


def _is_throttle(err: BaseException) -> bool:
    """A 503 SlowDown/ServiceUnavailable (s3fs raises it as OSError EBUSY, "Service Unavailable")."""
    return isinstance(err, OSError) and err.errno == errno.EBUSY or "SlowDown" in f"{type(err).__name__}: {err}"


def _is_transient(err: BaseException) -> bool:
    return (isinstance(err, _TRANSIENT) or _is_throttle(err)
            or any(n in type(err).__name__ or n in str(err) for n in _TRANSIENT_NAMES))


def _is_missing_bucket(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return "NoSuchBucket" in text or "bucket does not exist" in text.lower()


def _explain(err: BaseException, what: str, endpoint: str | None) -> StorageError:
    text = f"{type(err).__name__}: {err}"
    where = f" (endpoint {endpoint})" if endpoint else ""
    if isinstance(err, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "InvalidAccessKeyId" in text:
        hint = "access denied: check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)"
    elif _is_missing_bucket(err):
        hint = "the bucket does not exist"
    elif _is_throttle(err):
        hint = "the storage endpoint is throttling requests (503 SlowDown) or unavailable; retries did not get through"
    elif _is_transient(err) or "Could not connect" in text or "Connect" in type(err).__name__:
        hint = "the storage endpoint is unreachable"
    elif isinstance(err, FileNotFoundError):
        hint = "not found"
    else:
        hint = "storage error"
    return StorageError(f"cannot {what}{where}: {hint} [{text}]")


def with_retries(fn: Callable[[], T], what: str, *, attempts: int = 3, base_delay: float = 0.5,
                 endpoint: str | None = None, deadline: float | None = None) -> T:
    """Call `fn`, retrying transient failures with exponential backoff; explain the final error.

    `deadline` (`time.monotonic()`): no retry is started that would likely end past it (its back-off
    and another attempt as long as the last), so the error says what failed rather than that time ran out."""
    for attempt in range(attempts):
        started = time.monotonic()
        try:
            return fn()
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure is turned into a StorageError below
            delay = base_delay * 2**attempt
            in_time = deadline is None or 2 * time.monotonic() - started + delay < deadline
            if _is_transient(err) and attempt + 1 < attempts and in_time:
                time.sleep(delay)
                continue
            if isinstance(err, FileNotFoundError) and not _is_missing_bucket(err):
                raise FileNotFoundError(f"{what}: not found") from err
            raise _explain(err, what, endpoint) from err
    raise AssertionError("unreachable")


def file_url_path(url: str) -> str:
    """The local path of a `file:` URL: `file:///abs` → `/abs`; `file://data/x` and `file://runs` are the
    relative paths `data/x` and `runs` (what the writer meant), not host `data` with path `/x`."""
    parts = urlsplit(url)
    if parts.netloc in ("", "localhost"):
        return parts.path
    return f"{parts.netloc}{parts.path}"


def within_deadline(fn: Callable[[], T], seconds: float, what: str, endpoint: str | None = None) -> T:
    """`fn()`, or a StorageError once `seconds` have passed without its answer.

    fsspec waits on its event loop without a limit, so the call runs in a daemon thread that is
    abandoned on timeout; the client timeouts make it end by itself soon after.
    """
    done, box = threading.Event(), {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name=f"storage: {what}", daemon=True).start()
    if not done.wait(seconds):
        where = f" (endpoint {endpoint})" if endpoint else ""
        raise StorageError(f"cannot {what}{where}: no answer within {seconds:g} s (storage.timeout_s); "
                           "the endpoint accepts connections but does not respond")
    if "error" in box:
        raise box["error"]
    return box["value"]


def resolve(url: str | os.PathLike[str] | Location, settings: S3Options) -> Location:
    """Turn a path or URL into a Location that carries `settings` (see `S3Options.of`)."""
    if isinstance(url, Location):
        return url
    text = str(url)
    parts = urlsplit(text)
    if parts.scheme in ("", "file") or (len(parts.scheme) == 1 and os.name == "nt"):
        local = file_url_path(text) if parts.scheme == "file" else text
        path = str(Path(local).expanduser().resolve())
        return Location(path, "file", path, settings)
    if parts.scheme in ("s3", "s3a"):
        if not parts.netloc:
            raise StorageError(f"{text}: an s3:// location needs a bucket (s3://bucket/prefix)")
        path = f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
        return Location(f"s3://{path}", "s3", path, settings.for_url(parse_qs(parts.query)))
    raise StorageError(f"{text}: unsupported location scheme {parts.scheme!r}; use a local path, file:// or s3://")


def local(path: str | os.PathLike[str] | Location) -> Location:
    """A Location as it is, or a local path or `file://` URL as one. An `s3://` text is refused: only
    `resolve` with the storage settings may turn it into a Location, so none falls back to the environment."""
    if isinstance(path, Location):
        return path
    if urlsplit(str(path)).scheme in ("s3", "s3a"):
        raise StorageError(f"{path}: resolve it with the storage settings (thalia_ray.storage.resolve); "
                           "here only a local path or a Location is accepted")
    return resolve(path, S3Options())


def walk_files(loc: Location) -> Iterator[Location]:
    """Every file below a location (recursive), as Locations."""
    root = loc.path.rstrip("/")
    for path in sorted(loc._call("list", lambda: loc.fs.find(root))):
        yield loc.join(path[len(root) + 1:])
