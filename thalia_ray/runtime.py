"""Connect to or start Ray, size it to the machine, and keep its output quiet.

`start` joins the cluster named by `RAY_ADDRESS` (or `runtime.address`) when there is one, so the same
command works inside a Ray Job and on a laptop; otherwise it starts a single-node Ray sized to what
this process may really use (CPU affinity and cgroup quota, not the host's core count). Credentials
never pass through Ray: Ray writes a job's `runtime_env` into its session logs, so only non-secret
storage settings (endpoint, region, profile name) are forwarded there. Workers of a local Ray inherit
this process's environment, credentials included; on a cluster they come from the cluster's own
environment (instance roles, secret references), see the README.
Workers forward warnings only; Ray folds repeated worker lines unless `RAY_DEDUP_LOGS=0` (read when
`ray` is imported, so set it in the environment, as the tests do).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

from thalia_ray.config import RuntimeConfig, StorageConfig
from thalia_ray.credentials import shapes
from thalia_ray.interrupts import reclaim_signals

log = logging.getLogger("thalia_ray.runtime")

# Non-secret settings workers need to reach S3-compatible storage. Key ids, secret keys and session
# tokens are never forwarded: `runtime_env` values end up in Ray's world-readable session logs.
STORAGE_ENV_NAMES = (
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Keep idle worker processes (and their imports, open cubes, parsed headers) between epochs. Ray's
# defaults end idle workers above one per CPU after about a second, so every epoch re-imported torch,
# zarr and xarray in fresh processes (ray-notes.md, "Worker-process churn"). Set here when this process
# starts Ray; a cluster the service joins needs the same settings as environment variables of
# `ray start` on every node: RAY_num_workers_soft_limit, RAY_idle_worker_killing_time_threshold_ms.
WORKER_REUSE_MIN_SOFT_LIMIT = 16
IDLE_WORKER_KEEP_MS = 600_000


def worker_reuse_config(num_cpus: int) -> dict[str, Any]:
    """Keyword arguments of `ray.init` (or a `Cluster` node) that keep idle workers: a soft limit well above
    the CPU count, 10 min idle."""
    from thalia_ray import ray_internals

    return ray_internals.system_config(max(WORKER_REUSE_MIN_SOFT_LIMIT, 4 * num_cpus), IDLE_WORKER_KEEP_MS)


# ------------------------------------------------------------------------------------- logging
def setup_logging(level: str | int = "INFO") -> logging.Logger:
    """One readable line per record for the `thalia_ray` logger; calling it again only changes the level."""
    logger = logging.getLogger("thalia_ray")
    logger.setLevel(level)
    if not any(getattr(h, "_thalia", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._thalia = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger


# ------------------------------------------------------------------------------------- machine
def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup (v2 `cpu.max` or v1 CFS quota), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota (rounded up, at least 1)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cuda_devices() -> list[str]:
    """Names of the visible CUDA devices; empty without torch or a GPU."""
    if importlib.util.find_spec("torch") is None:
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_machine() -> dict[str, Any]:
    """What a run or benchmark ran on, stored with its record so numbers can be compared honestly."""
    memory = _memory_bytes()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": usable_cpus(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "gpus": _cuda_devices(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ray": _version("ray"),
    }


# ------------------------------------------------------------------------------------- Ray
def storage_env_vars(storage_cfg: StorageConfig | None = None,
                     environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Non-secret environment for workers to reach the store: the endpoint, region and profile set here,
    or else from the storage config. A value that carries a credential (`credentials.shapes`: a password in
    an endpoint URL, a key under a harmless name) is left out."""
    env = {name: environ[name] for name in STORAGE_ENV_NAMES
           if environ.get(name) and not shapes(environ[name], name)}
    if storage_cfg is not None and storage_cfg.endpoint_url and not shapes(storage_cfg.endpoint_url):
        env.setdefault("AWS_ENDPOINT_URL", storage_cfg.endpoint_url)
    if storage_cfg is not None and storage_cfg.region:
        env.setdefault("AWS_REGION", storage_cfg.region)
    return env


def raised_in_task(err: BaseException) -> BaseException:
    """The error a Ray task or actor raised, without the task's traceback that Ray puts in front of it (Ray
    re-raises it as a RayTaskError that is also an instance of the original's class, once per hop)."""
    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    return err


def cluster_address(runtime_cfg: RuntimeConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """`RAY_ADDRESS` wins over the config, so a job submitted to a cluster runs on that cluster."""
    return environ.get("RAY_ADDRESS") or runtime_cfg.address or None


def local_resources(runtime_cfg: RuntimeConfig) -> dict[str, int]:
    """CPUs and GPUs for a local Ray: what the machine allows unless the config says otherwise."""
    cpus = runtime_cfg.num_cpus if runtime_cfg.num_cpus is not None else usable_cpus()
    gpus = runtime_cfg.num_gpus if runtime_cfg.num_gpus is not None else len(_cuda_devices())
    return {"num_cpus": cpus, "num_gpus": gpus}


DASHBOARD_PORT = 8265  # Ray's default


def free_port(preferred: int) -> int:
    """`preferred` when nothing listens on it here, else a port the system hands out."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")


def _dashboard_available() -> bool:
    # The dashboard ships with ray[default]; without it, Tune leaks placement groups.
    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "ray.dashboard"))


# Ray's own chatter (Data execution plans and progress bars, W&B banners) unless debugging; the
# values are not secrets, so they may travel in the job's runtime_env. Ray Train's is filtered by the
# run's LoggingConfig (train.trainer.run_config).
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "ERROR",  # at WARNING each execution still says "Progress bars disabled"
             "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "WANDB_SILENT": "true"}


def quiet_env(runtime_cfg: RuntimeConfig, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """QUIET_ENV less what the user set; nothing at `runtime.log_level: DEBUG`."""
    if runtime_cfg.log_level == "DEBUG":
        return {}
    return {k: v for k, v in QUIET_ENV.items() if k not in environ}


def _configure_data(runtime_cfg: RuntimeConfig) -> None:
    from ray.data import DataContext

    from thalia_ray import ray_internals

    quiet = runtime_cfg.log_level != "DEBUG"
    if quiet:
        # This driver's own executions; never lower a stricter level (a Ray worker process that ran this
        # is later reused for Ray Data's split coordinator, which QUIET_ENV sets to ERROR).
        data_logger = logging.getLogger("ray.data")
        data_logger.setLevel(max(data_logger.level, logging.WARNING))
        # Once per process, at WARNING: "Progress bars disabled. To enable, set ...".
        logging.getLogger(ray_internals.DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() and not quiet
    if runtime_cfg.data_cpu_limit is not None:
        # Train workers holding CPUs otherwise starve Data's read tasks on small machines.
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(cpu=runtime_cfg.data_cpu_limit)


# Printed by the driver each time the node's Python worker processes pass another multiple of Ray's
# start-up concurrency (the CPU count): warm workers (worker_reuse_config) pass it by design.
RAYLET_NOISE = ("worker processes have been started on node",)
# Ray core's advice about its own Train/Tune actors (ray-project/ray#53727), printed by their processes
# as an error line on every run; nothing a user of this service can or needs to change. And Ray Train's
# placement-group cleaner, which warns that a run's controller "is dead" whenever a sweep scheduler stops
# a trial, as it is meant to (the sweep's own lines say which trial stopped; a trial that really fails is
# reported by Tune).
WORKER_NOISE = ("has constructor arguments in the object store and max_restarts > 0",
                "Detected that the Ray Train controller actor")


def _without_noise(message: dict[str, Any]) -> list[str]:
    noise = RAYLET_NOISE if message.get("pid") == "raylet" else WORKER_NOISE
    return [line for line in message.get("lines", []) if not any(n in line for n in noise)]


def drop_ray_noise() -> None:
    """Keep RAYLET_NOISE and WORKER_NOISE off this driver's terminal; every other message (out of
    memory, crashed workers, a user's prints) still prints."""
    from thalia_ray import ray_internals

    ray_internals.filter_driver_output(_without_noise)


@dataclass
class RayRuntime:
    """A Ray connection. `started` means `start` ran `ray.init`: then `shutdown` (and leaving the `with`
    block) stops the local Ray, or disconnects from the cluster at `address`, which keeps running.
    A Ray that was already initialised in this process belongs to its owner and is left alone."""

    address: str | None
    started: bool
    resources: dict[str, float]
    env_var_names: tuple[str, ...] = field(default=())
    # Variables `start` set in this process for a local Ray, with their values before (None: unset),
    # put back at shutdown: Ray's clients prefer them to any address they are given.
    replaced_env: dict[str, str | None] = field(default_factory=dict)

    def shutdown(self) -> None:
        import ray

        if self.started and ray.is_initialized():
            ray.shutdown()
            for name, value in self.replaced_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            if self.address:
                log.info("disconnected from Ray at %s", self.address)
            else:
                log.info("local Ray stopped")

    def __enter__(self) -> "RayRuntime":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()


def _replace_env(replaced: dict[str, str | None], name: str, value: str) -> None:
    """Set `name` in this process, keeping its value before (None: unset) in `replaced` for shutdown."""
    replaced.setdefault(name, os.environ.get(name))
    os.environ[name] = value


def start(runtime_cfg: RuntimeConfig, *, storage_env: dict[str, str] | None = None) -> RayRuntime:
    """Connect to the configured cluster or start a local one; configure Ray Data for this driver.

    `storage_env` adds non-secret environment variables for workers on top of the storage settings
    found here (for example `storage_env_vars(cfg.storage)`); it must never carry credentials.
    """
    import ray

    from thalia_ray import ray_internals

    ray_internals.check_ray_version()
    _configure_data(runtime_cfg)
    if runtime_cfg.log_level != "DEBUG":
        drop_ray_noise()
        # Ray's notice, at every local start, that its cluster uses token authentication (what we want).
        logging.getLogger(ray_internals.TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
        ray_internals.plain_tune_output()
    if ray.is_initialized():
        log.info("using the Ray already initialised in this process")
        return RayRuntime(None, False, dict(ray.cluster_resources()))

    env = {**quiet_env(runtime_cfg), **storage_env_vars(), **(storage_env or {})}
    if not sys.stderr.isatty():  # drivers inside the cluster (Tune trials) would draw bars into the log
        env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    verbose = runtime_cfg.log_level == "DEBUG"
    common: dict[str, Any] = {
        "runtime_env": {"env_vars": env} if env else None,
        "log_to_driver": True,
        # Workers and Ray's own driver-side logger emit warnings only (everything when debugging).
        "logging_config": ray.LoggingConfig(log_level="DEBUG" if verbose else "WARNING"),
        "logging_level": logging.DEBUG if verbose else logging.WARNING,
    }
    address = cluster_address(runtime_cfg)
    replaced: dict[str, str | None] = {}
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, **common)
    else:
        sizes = local_resources(runtime_cfg)
        dashboard = _dashboard_available()
        port = free_port(DASHBOARD_PORT) if dashboard else None
        log.info("starting a local Ray: %d CPUs, %d GPUs, dashboard %s", sizes["num_cpus"], sizes["num_gpus"],
                 f"on 127.0.0.1:{port}" if dashboard else "unavailable")
        if port is not None:
            # Ray's state API, which Ray Train's placement-group cleaner (a worker process) calls, finds the
            # cluster by its API server; with another Ray on this machine a lookup finds two and fails.
            # Every process of this Ray inherits the environment it is started with.
            _replace_env(replaced, "RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        ray.init(
            address="local",  # never silently join some other Ray started on this machine
            **sizes,
            object_store_memory=runtime_cfg.object_store_memory,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            **worker_reuse_config(sizes["num_cpus"]),
            **common,
        )
        # The same lookup by GCS address, from this driver's own Ray helpers.
        _replace_env(replaced, "RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    reclaim_signals()  # Ray's core worker replaced the SIGTERM handler with one that aborts (interrupts)
    if env:
        log.info("workers get these environment variables: %s", ", ".join(sorted(env)))
    return RayRuntime(address, True, dict(ray.cluster_resources()), tuple(sorted(env)), replaced)
