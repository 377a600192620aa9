"""One test per hook into Ray's private API (thalia_ray/ray_internals.py): each fails when a Ray release
moves, renames or changes what the hook relies on, so an upgrade shows at once which hooks to rewrite.
None of them starts Ray; test_pipeline and test_runtime check the hooks' effect on running executions."""
from __future__ import annotations

import importlib
import inspect
import json
import logging
from pathlib import Path

import pytest
import ray

from thalia_ray import ray_internals


def test_the_installed_ray_is_the_one_the_hooks_were_written_for() -> None:
    ray_internals.check_ray_version()  # what runtime.start runs first
    assert ".".join(ray.__version__.split(".")[:2]) == ray_internals.RAY_VERSION


def test_another_ray_is_refused_with_the_way_out_unless_the_check_is_skipped() -> None:
    with pytest.raises(ray_internals.RayVersionError) as err:
        ray_internals.check_ray_version("2.61.0", environ={})
    message = str(err.value)
    assert "Ray 2.61.0" in message and f"{ray_internals.RAY_VERSION}.x" in message
    assert f"{ray_internals.SKIP_VERSION_CHECK_ENV}=1" in message
    ray_internals.check_ray_version("2.61.0", environ={ray_internals.SKIP_VERSION_CHECK_ENV: "1"})
    with pytest.raises(ray_internals.RayVersionError):
        ray_internals.check_ray_version("3.60.0", environ={ray_internals.SKIP_VERSION_CHECK_ENV: "0"})


def test_execution_callbacks_hook() -> None:
    """Our callback classes are instantiated from the context's list and called with the executor."""
    from ray.data import DataContext

    callback = ray_internals.ExecutionCallback
    for method in ("before_execution_starts", "on_execution_step"):
        assert list(inspect.signature(getattr(callback, method)).parameters) == ["self", "executor"]
    context = DataContext()

    class Probe(callback):
        pass

    ray_internals.add_execution_callbacks(context, Probe)
    assert Probe in context.custom_execution_callback_classes
    assert Probe in context.execution_callback_classes  # what an execution instantiates


def test_cluster_totals_hook() -> None:
    """The resource manager keeps its source of cluster totals in `_get_total_resources` and its global
    limits read it; `ExecutionResources` is built from a `ray.cluster_resources()` dict."""
    from ray.data._internal.execution.resource_manager import ResourceManager

    assert "get_total_resources" in inspect.signature(ResourceManager.__init__).parameters
    assert "self._get_total_resources = get_total_resources" in inspect.getsource(ResourceManager.__init__)
    assert "self._get_total_resources()" in inspect.getsource(ResourceManager.get_global_limits)
    resources = ray_internals.ExecutionResources.from_resource_dict({"CPU": 3.0, "GPU": 1.0, "memory": 5e9,
                                                                      "object_store_memory": 2e9})
    assert (resources.cpu, resources.gpu, resources.object_store_memory) == (3.0, 1.0, 2e9)

    class Manager:
        _get_total_resources = None

    class Executor:
        _resource_manager = Manager()

    executor = Executor()
    ray_internals.set_total_resources(executor, ray_internals.cluster_resources)
    assert executor._resource_manager._get_total_resources is ray_internals.cluster_resources


def test_driver_output_hook() -> None:
    """Ray prints forwarded output through `worker.print_to_stdstream(data, ignore_prefix)`, looked up by
    name when `ray.init` connects, so a wrapper installed before then is the one called."""
    from ray._private import worker

    printer = inspect.unwrap(worker.print_to_stdstream)  # as Ray defines it, wrapped or not
    assert list(inspect.signature(printer).parameters)[:2] == ["data", "ignore_prefix"]
    assert printer.__module__ == worker.__name__
    assert "functools.partial(print_to_stdstream" in inspect.getsource(worker.connect)
    assert "print_to_stdstream(" in inspect.getsource(worker.listen_error_messages)


def test_worker_reuse_hook() -> None:
    """`ray.init` takes `_system_config`, and Ray's core knows both keys (an unknown key fails its start)."""
    assert 'kwargs.pop("_system_config"' in inspect.getsource(ray.init)
    kwargs = ray_internals.system_config(16, 600_000)
    (name, settings), = kwargs.items()
    assert name == "_system_config"
    core = b"".join(path.read_bytes() for path in Path(ray.__file__).parent.glob("_raylet*.so"))
    for key in settings:
        assert key.encode() in core, f"Ray's core no longer defines the system config {key}"


@pytest.mark.parametrize("name", [ray_internals.DATA_PROGRESS_LOGGER, ray_internals.TOKEN_NOTICE_LOGGER])
def test_private_logger_hook(name: str) -> None:
    """Each quieted logger is the one the Ray module that prints the message logs to."""
    module = importlib.import_module(name)
    assert isinstance(module.logger, logging.Logger) and module.logger.name == name


def test_plain_tune_output_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune.experimental.output import get_air_verbosity

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    assert get_air_verbosity(0) is not None  # the new output, header box and all
    environ: dict[str, str] = {}
    ray_internals.plain_tune_output(environ)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", environ["RAY_AIR_NEW_OUTPUT"])
    assert get_air_verbosity(0) is None
    kept = {"RAY_AIR_NEW_OUTPUT": "1"}
    ray_internals.plain_tune_output(kept)
    assert kept == {"RAY_AIR_NEW_OUTPUT": "1"}


def test_train_snapshot_hook() -> None:
    """Ray Train's snapshot has the name and fields we read, and is written through the storage
    filesystem's `open_output_stream` (which atomic_arrow makes whole-or-nothing)."""
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.checkpoint import checkpoint_manager as manager

    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == ray_internals.TRAIN_SNAPSHOT
    assert "open_output_stream" in inspect.getsource(manager.CheckpointManager._write_state_to_storage)
    result = manager._TrainingResultState(checkpoint_dir_name="checkpoint_2026", metrics={"loss": 0.5})
    fields = {name: [] for name, info in manager._CheckpointManagerState.model_fields.items() if info.is_required()}
    fields["current_report_index"] = 1
    state = manager._CheckpointManagerState(**{**fields, "checkpoint_results": [result],
                                               "latest_checkpoint_result": result})
    assert ray_internals.latest_checkpoint_dir(state.model_dump_json()) == "checkpoint_2026"
    assert ray_internals.latest_checkpoint_dir(json.dumps({"latest_checkpoint_result": None})) is None
    with pytest.raises(ValueError):
        ray_internals.latest_checkpoint_dir("[1, 2]")
    with pytest.raises(ValueError):
        ray_internals.latest_checkpoint_dir("{truncated")
