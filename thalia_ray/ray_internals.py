"""Every use of Ray's private API, in one place, for the Ray release it was written for.

Ray's public API cannot (yet) quiet its driver output, bound Ray Data's executions by the cluster's
resources, keep idle workers alive or say where Ray Train lists a run's checkpoints; the hooks below do,
through names Ray does not promise to keep. A Ray upgrade is therefore one review of this module:
`check_ray_version` (run by `runtime.start`) refuses any other Ray major.minor than `RAY_VERSION` with a
message that says what to do, and tests/test_ray_internals.py has one test per hook that fails when a
Ray release moves or changes it. Set `THALIA_SKIP_RAY_VERSION_CHECK=1` to run on another Ray anyway
(then each hook that Ray moved fails on its own, or is skipped where it can be).

| hook | Ray's private name | used by |
| --- | --- | --- |
| execution callbacks | `ray.data._internal...ExecutionCallback`, `DataContext.custom_execution_callback_classes` | data/execution.py, data/pipeline.py |
| cluster-wide limits | `ResourceManager._get_total_resources`, `ExecutionResources.from_resource_dict` | data/execution.py |
| driver-output filter | `ray._private.worker.print_to_stdstream` | runtime.drop_ray_noise |
| worker reuse | `ray.init(_system_config=...)` keys `num_workers_soft_limit`, `idle_worker_killing_time_threshold_ms` | runtime.start, bench |
| quiet loggers | `ray.data._internal.progress`, `ray._private.authentication.authentication_token_setup` | runtime |
| plain Tune output | the `RAY_AIR_NEW_OUTPUT` environment variable | runtime.start |
| Train's snapshot | `checkpoint_manager_snapshot.json` and its `latest_checkpoint_result.checkpoint_dir_name` | train/trainer.py, atomic_arrow.py |

Ray Train writes that snapshot with `storage_filesystem.open_output_stream`, which `atomic_arrow` makes
whole-or-nothing; the test of the snapshot hook checks that too. Imported by the modules that run Ray
work (it imports `ray.data`), never by modules that only describe it.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Mapping, MutableMapping

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.interfaces.execution_options import ExecutionResources

from thalia_ray.errors import ThaliaError

RAY_VERSION = "2.60"  # the Ray major.minor these hooks were written for and tested against
SKIP_VERSION_CHECK_ENV = "THALIA_SKIP_RAY_VERSION_CHECK"

DATA_PROGRESS_LOGGER = "ray.data._internal.progress"  # "Progress bars disabled..." once per process
TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"  # token notice at each start
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's registered checkpoints
_FILTERED = "_thalia"  # marks Ray's printer once wrapped

__all__ = ["DATA_PROGRESS_LOGGER", "RAY_VERSION", "SKIP_VERSION_CHECK_ENV", "TOKEN_NOTICE_LOGGER", "TRAIN_SNAPSHOT",
           "ExecutionCallback", "ExecutionResources", "RayVersionError", "add_execution_callbacks",
           "check_ray_version", "cluster_resources", "filter_driver_output", "latest_checkpoint_dir",
           "plain_tune_output", "set_total_resources", "system_config"]


class RayVersionError(ThaliaError, RuntimeError):
    """The installed Ray is not the release `ray_internals` was written for."""


def check_ray_version(installed: str = ray.__version__, environ: Mapping[str, str] = os.environ) -> None:
    """Refuse a Ray whose major.minor differs from RAY_VERSION, unless SKIP_VERSION_CHECK_ENV is set."""
    if environ.get(SKIP_VERSION_CHECK_ENV, "") not in ("", "0"):
        return
    if ".".join(installed.split(".")[:2]) != RAY_VERSION:
        raise RayVersionError(
            f"Ray {installed} is installed, but thalia-ray's hooks into Ray's internals were written for Ray "
            f"{RAY_VERSION}.x: install it (`pip install -c constraints.txt 'ray[default,train,tune,data]'`), or set "
            f"{SKIP_VERSION_CHECK_ENV}=1 to try this Ray anyway (thalia_ray/ray_internals.py lists the hooks)")


# ------------------------------------------------------------------------------------- Ray Data
def add_execution_callbacks(context: Any, *callbacks: type[ExecutionCallback]) -> None:
    """Have every execution of a dataset with this `DataContext` run these callback classes too."""
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, *callbacks]


def cluster_resources() -> ExecutionResources:
    """The cluster's resources now (CPU, GPU, memory, object store), as Ray Data's limits count them."""
    return ExecutionResources.from_resource_dict(ray.cluster_resources())


def set_total_resources(executor: Any, source: Callable[[], ExecutionResources]) -> None:
    """Make `source` the executor's one source of cluster totals (its resource manager's
    `get_global_limits` reads it every second)."""
    executor._resource_manager._get_total_resources = source


# ------------------------------------------------------------------------------------- Ray core
def filter_driver_output(keep: Callable[[dict[str, Any]], list[str]]) -> None:
    """Print only `keep(message)` of each message Ray forwards to this driver's terminal (a message:
    `{"lines", "pid", "is_err", ...}`; nothing when it keeps no line). Ray prints them through
    `print_to_stdstream`, which has no filter hook, so that function is wrapped, once, before `ray.init`
    binds it. Left alone if Ray renamed it."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, _FILTERED, False):
        return

    @functools.wraps(original)
    def filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        lines = keep(data)
        return original({**data, "lines": lines}, *args, **kwargs) if lines else None

    setattr(filtered, _FILTERED, True)
    worker.print_to_stdstream = filtered


def system_config(num_workers_soft_limit: int, idle_worker_keep_ms: int) -> dict[str, dict[str, int]]:
    """Keyword arguments of `ray.init` (or a `Cluster` node) that keep idle worker processes: at most
    `num_workers_soft_limit` of them, each for `idle_worker_keep_ms`."""
    return {"_system_config": {"num_workers_soft_limit": num_workers_soft_limit,
                               "idle_worker_killing_time_threshold_ms": idle_worker_keep_ms}}


def plain_tune_output(environ: MutableMapping[str, str] = os.environ) -> None:
    """Tune's older output, which prints nothing at verbose=0 (the new one prints a header box anyway);
    a value the user set is kept."""
    environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


# ------------------------------------------------------------------------------------- Ray Train
def latest_checkpoint_dir(snapshot_text: str) -> str | None:
    """The folder name of the latest checkpoint in Ray Train's snapshot (TRAIN_SNAPSHOT), None when it has
    none; ValueError when the text is not a snapshot."""
    try:
        latest = (json.loads(snapshot_text).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except AttributeError as err:
        raise ValueError(f"not a checkpoint snapshot: {err}") from None
    return latest if isinstance(latest, str) and latest else None
