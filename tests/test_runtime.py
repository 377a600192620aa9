"""Runtime: machine sizing, worker environment, logging, and starting/joining Ray.

Tests that initialise Ray themselves run in a subprocess, so they never touch the session's Ray.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from thalia_ray import ray_internals, runtime
from thalia_ray.config import RuntimeConfig, StorageConfig

REPO = Path(__file__).resolve().parents[1]
SECRET = "not-a-real-secret-5f1c9e"


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the repo importable; fail with its output if it fails."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- pure parts
def test_storage_env_vars_forwards_settings_never_credentials():
    environ = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "AWS_REGION": "",
               "HOME": "/root", "AWS_ENDPOINT_URL": "http://env:1", "AWS_PROFILE": "lab"}
    env = runtime.storage_env_vars(StorageConfig(endpoint_url="http://cfg:2", region="eu-west-3"), environ)
    assert env == {"AWS_PROFILE": "lab", "AWS_ENDPOINT_URL": "http://env:1", "AWS_REGION": "eu-west-3"}
    assert runtime.storage_env_vars(None, {"HOME": "/root"}) == {}
    with_password = {"AWS_ENDPOINT_URL": "http://user:pw@env:1"}  # a credential inside a URL stays out
    assert runtime.storage_env_vars(StorageConfig(endpoint_url="http://u:pw@cfg:2"), with_password) == {}


def test_cluster_address_prefers_ray_address():
    cfg = RuntimeConfig(address="10.0.0.1:6379")
    assert runtime.cluster_address(cfg, {"RAY_ADDRESS": "10.0.0.2:6379"}) == "10.0.0.2:6379"
    assert runtime.cluster_address(cfg, {}) == "10.0.0.1:6379"
    assert runtime.cluster_address(RuntimeConfig(), {"RAY_ADDRESS": ""}) is None


def test_local_resources_follow_machine_unless_configured():
    assert runtime.local_resources(RuntimeConfig(num_cpus=7, num_gpus=0)) == {"num_cpus": 7, "num_gpus": 0}
    sized = runtime.local_resources(RuntimeConfig(num_gpus=0))
    assert sized["num_cpus"] == runtime.usable_cpus()
    assert 1 <= runtime.usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert runtime._cgroup_cpu_quota(tmp_path) == expected


def test_describe_machine():
    info = runtime.describe_machine()
    assert info["cpu_count"] == runtime.usable_cpus()
    assert info["ray"] == importlib.metadata.version("ray")
    assert info["torch"] == importlib.metadata.version("torch")
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["memory_gib"] > 0 and info["cpu_model"]
    assert isinstance(info["gpus"], list)
    json.dumps(info)  # stored in run records as plain JSON


@pytest.fixture()
def restore_thalia_logger():
    """setup_logging changes a process-wide logger; put it back so other tests' caplog still works."""
    logger = logging.getLogger("thalia_ray")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


def test_setup_logging_one_handler_one_line_format(restore_thalia_logger):
    logger = runtime.setup_logging("DEBUG")
    runtime.setup_logging("WARNING")
    ours = [h for h in logger.handlers if getattr(h, "_thalia", False)]
    assert len(ours) == 1 and logger.level == logging.WARNING and not logger.propagate
    record = logger.makeRecord("thalia_ray.x", logging.WARNING, __file__, 1, "epoch %d done", (3,), None)
    line = ours[0].format(record)
    assert line.endswith("WARNING thalia_ray.x: epoch 3 done") and "\n" not in line


# ------------------------------------------------------------------------------------- Ray
def test_ray_advisories_are_dropped_and_other_ray_messages_print(capsys):
    from ray._private import worker

    runtime.drop_ray_noise()
    runtime.drop_ray_noise()  # wraps once
    noise = ("WARNING: 12 PYTHON worker processes have been started on node: abc with address: 10.0.0.1, "
             "which is 6x the maximum expected startup concurrency (2).")
    oom = "4 Workers (tasks / actors) killed due to memory pressure (OOM)"
    worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": [noise, oom], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": ["worker processes have been started on node (a user's own print)"],
                               "pid": 123, "is_err": False}, ignore_prefix=False)
    advice = ("[2026-11-26 03:11:05,080 E 13655 13686] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: '93' has constructor arguments in the object store and max_restarts > 0.")
    worker.print_to_stdstream({"lines": [advice], "pid": 13655, "is_err": True}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": [advice, "epoch 1/2 train loss 0.5"], "pid": 13655, "is_err": True},
                              ignore_prefix=False)
    stopped = ("[2026-12-07 09:58:20,186 W 19888 19930] placement_group_cleaner.py:120 -- Detected that the Ray "
               "Train controller actor (b16103558a359f2612c4e77501000000) is dead. Cleaning up placement group")
    worker.print_to_stdstream({"lines": [stopped], "pid": 19888, "is_err": True}, ignore_prefix=False)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "PYTHON worker processes" not in text and "PreemptionWatcher" not in text and "controller" not in text
    assert text.count(oom) == 1 and "a user's own print" in text and text.count("epoch 1/2 train loss") == 1


def test_a_quiet_start_never_lowers_a_stricter_ray_data_level(ray_cluster):
    """A worker process reused for Ray Data's split coordinator keeps the ERROR level it was given."""
    data_logger = logging.getLogger("ray.data")
    before = data_logger.level
    try:
        data_logger.setLevel(logging.ERROR)
        runtime.start(RuntimeConfig(log_level="INFO"))
        assert data_logger.level == logging.ERROR
        data_logger.setLevel(logging.NOTSET)
        runtime.start(RuntimeConfig(log_level="INFO"))
        assert data_logger.level == logging.WARNING  # a driver's own executions: warnings only
        assert logging.getLogger("ray.data._internal.progress").getEffectiveLevel() == logging.ERROR
    finally:
        data_logger.setLevel(before)


def test_reuses_an_already_initialised_ray(ray_cluster):
    notice = logging.getLogger(ray_internals.TOKEN_NOTICE_LOGGER)
    notice.setLevel(logging.NOTSET)
    rt = runtime.start(RuntimeConfig())
    assert not rt.started
    assert not notice.isEnabledFor(logging.WARNING)  # Ray's token-authentication notice, at every local start
    rt.shutdown()
    assert ray_cluster.is_initialized()


@pytest.mark.slow
def test_free_port_prefers_the_given_port_and_falls_back_to_any():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert runtime.free_port(taken) != taken
    assert runtime.free_port(taken) == taken  # free again


def test_local_ray_start_and_shutdown():
    """A local Ray sized by the config; workers inherit credentials, which are never forwarded or logged."""
    proc = _python("""
        import json, ray, time
        from ray.data import DataContext
        from thalia_ray.config import RuntimeConfig
        from thalia_ray.runtime import setup_logging, start
        setup_logging("DEBUG")
        cfg = RuntimeConfig(num_cpus=1, num_gpus=0, object_store_memory=100_000_000, data_cpu_limit=0.5)
        with start(cfg) as rt:
            key = ray.get(ray.remote(lambda: __import__("os").environ.get("AWS_SECRET_ACCESS_KEY")).remote())
            ctx = DataContext.get_current()

            @ray.remote(num_cpus=0)
            class Gate:  # holds 4 tasks until all have started: 4 worker processes on 1 CPU
                def __init__(self): self.n = 0
                def arrive(self): self.n += 1
                def count(self): return self.n

            @ray.remote(num_cpus=0.25)
            def held(gate):
                import os, time
                ray.get(gate.arrive.remote())
                while ray.get(gate.count.remote()) < 4:
                    time.sleep(0.05)
                return os.getpid(), os.environ.get("RAY_DATA_LOG_LEVEL")

            @ray.remote(num_cpus=0)
            def state_api_from_a_worker():  # as Ray Train's placement-group cleaner calls it
                import os
                from ray.util.state import list_nodes
                return os.environ.get("RAY_API_SERVER_ADDRESS"), len(list_nodes())

            api = ray.get(state_api_from_a_worker.remote())
            first = ray.get([held.remote(gate) for gate in [Gate.remote()] for _ in range(4)])
            time.sleep(3)  # Ray's default ends idle workers above one per CPU after about a second
            again = ray.get([held.remote(gate) for gate in [Gate.remote()] for _ in range(4)])
            out = {"started": rt.started, "address": rt.address, "cpus": rt.resources.get("CPU"),
                   "names": list(rt.env_var_names), "worker_key_ok": key == "%s",
                   "data_cpu": ctx.execution_options.resource_limits.cpu,
                   "bars": ctx.enable_progress_bars, "first": sorted(first), "again": sorted(again),
                   "api": api, "driver_api": __import__("os").environ.get("RAY_API_SERVER_ADDRESS")}
        out["after"] = ray.is_initialized()
        out["env_after"] = [__import__("os").environ.get(n) for n in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")]
        print(json.dumps(out))
    """ % SECRET, env={"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "id-for-test"})
    out = _last_json(proc.stdout)
    assert out["started"] and out["address"] is None and out["cpus"] == 1.0
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(out["names"])
    assert out["worker_key_ok"]
    assert out["data_cpu"] == 0.5 and out["bars"] is False
    assert len({pid for pid, _ in out["first"]}) == 4 and out["again"] == out["first"]  # idle workers kept
    assert {quiet for _, quiet in out["first"]} == {"ERROR"}  # Ray Data's INFO chatter off in workers
    assert out["after"] is False
    # Every process of this Ray knows its API server, so the state API never picks another Ray on the machine.
    assert out["api"] == [out["driver_api"], 1] and out["driver_api"].startswith("http://127.0.0.1:")
    assert out["env_after"] == [None, None]  # put back at shutdown: later Ray clients here pick no stale address
    assert "starting a local Ray: 1 CPUs" in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_joins_existing_cluster_from_ray_address(tmp_path):
    """A second driver joins through RAY_ADDRESS; leaving only disconnects it, the cluster keeps running."""
    owner_log = open(tmp_path / "owner.log", "w")
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import ray, sys
            ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100_000_000,
                     log_to_driver=False)
            print(ray.get_runtime_context().gcs_address, flush=True)
            sys.stdin.readline()
            print("alive", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
            ray.shutdown()
        """)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=owner_log, text=True, cwd=REPO,
    )
    try:
        address = owner.stdout.readline().strip()
        assert address, f"the owning driver did not start Ray:\n{(tmp_path / 'owner.log').read_text()}"
        proc = _python("""
            import json, ray
            from thalia_ray.config import RuntimeConfig
            from thalia_ray.runtime import start
            with start(RuntimeConfig(num_cpus=8)) as rt:
                value = ray.get(ray.remote(lambda: 2 * 21).remote())
                out = {"started": rt.started, "address": rt.address, "cpus": rt.resources.get("CPU"),
                       "value": value}
            out["after"] = ray.is_initialized()
            print(json.dumps(out))
        """, env={"RAY_ADDRESS": address})
        out = _last_json(proc.stdout)
        assert out == {"started": True, "address": address, "cpus": 1.0, "value": 42, "after": False}
        owner.stdin.write("go\n")
        owner.stdin.flush()
        assert owner.stdout.readline().strip() == "alive 42"
        assert owner.wait(timeout=60) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner_log.close()


def _files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under `roots` whose bytes contain `secret` (plain, or as Ray's escaped JSON would)."""
    needle = secret.encode()
    return [str(p) for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.mark.slow
def test_credentials_never_reach_ray_logs_the_store_or_wandb(synthetic_root, tmp_path):
    """A real export and a real training run with canary credentials in the environment: the canary is in
    no file of the Ray session, the shards, the store or W&B, and in nothing printed."""
    import tempfile

    from tests.helpers import cli, tiny_train_config

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    canary = {"AWS_ACCESS_KEY_ID": "AKIACANARY" + SECRET[-6:], "AWS_SECRET_ACCESS_KEY": "canary-key-" + SECRET,
              "AWS_SESSION_TOKEN": "canary-token-" + SECRET}
    env = {**canary, "RAY_TMPDIR": str(ray_tmp), "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_MODE": "offline"}
    config = tiny_train_config(tmp_path / "run.yaml", synthetic_root, tmp_path / "store")
    try:
        export = cli(["export", str(config), "--out", str(tmp_path / "shards"), "--split", "val",
                      "--samples-per-shard", "8"], env)
        train = cli(["train", str(config), "--set", "runtime.wandb.mode=offline", "--run-id", "canary"], env)
        printed = export.stdout + export.stderr + train.stdout + train.stderr
        assert export.returncode == 0 and train.returncode == 0, printed[-4000:]
        sessions = list((ray_tmp / "ray").glob("session_2*"))
        assert len(sessions) == 2 and any((s / "logs").rglob("runtime_env*") for s in sessions)  # Ray's logs
        run = tmp_path / "store" / "runs" / "canary"
        assert run.joinpath("run.json").exists() and any(run.joinpath("tracking", "wandb").rglob("*.wandb"))
        for value in canary.values():
            assert value not in printed
            assert _files_holding(value, ray_tmp, tmp_path) == []
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
