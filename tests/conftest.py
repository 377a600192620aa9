"""Shared fixtures: one Ray instance and one real S3 endpoint (moto over HTTP) for the whole session."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from thalia_ray.bench.s3server import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_META = REPO.parent / "shared" / "thalia_meta"
SHARED_CRDS = REPO.parent / "shared" / "kuberay"  # KubeRay CRDs: the package ships none

# Quiet, fast Ray for tests.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@contextlib.contextmanager
def _moto_server(**env: str) -> Iterator[str]:
    """A `moto_server` process serving S3 over HTTP on 127.0.0.1; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 endpoint: the `moto_server` process serving HTTP on 127.0.0.1."""
    with _moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def strict_s3_endpoint():
    """A moto server that checks credentials, so unknown keys are refused as on real S3."""
    with _moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as url:
        yield url


@pytest.fixture(scope="session")
def s3_env(moto_endpoint):
    """Credentials and endpoint in the environment, as a user would set them (never in files)."""
    values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(s3_env):
    """A fresh bucket on the moto server; yields its `s3://` URL."""
    import boto3

    name = f"thalia-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_env):
    """One local Ray for the whole session, sized for a 2-core machine.

    It depends on `s3_env` so that S3 credentials are in the environment before Ray starts its workers.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join another Ray that happens to run on this machine
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_meta() -> Path:
    if not (SHARED_META / "annotations.json.gz").exists():
        pytest.skip(f"real Thalia metadata not found at {SHARED_META}")
    return SHARED_META


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic Thalia dataset (sampled mode, no real metadata needed), generated once.

    3 frames of 96 px, 8 time-series groups each (lengths drawn from the real distribution); every
    sampled frame has positives in train, val and test. Layout as published: `{frame}.zarr`,
    annotations.json, quality_timeseries.json, statistics.json.
    """
    from thalia_ray.synthetic.generator import synthesize

    root = tmp_path_factory.mktemp("synthetic") / "thalia"
    synthesize(str(root), frames=3, size=96, seed=0, max_groups_per_frame=8)
    return root


@pytest.fixture()
def kuberay_crds(monkeypatch) -> Path:
    """The KubeRay CRD folder from ../shared, also given to the code as THALIA_CRDS."""
    if not any(SHARED_CRDS.glob("*.yaml")):
        pytest.skip(f"KubeRay CRDs not found at {SHARED_CRDS}")
    monkeypatch.setenv("THALIA_CRDS", str(SHARED_CRDS))
    return SHARED_CRDS


@pytest.fixture()
def small_disk(tmp_path):
    """A 30 MiB tmpfs (room for one checkpoint of the tiny model, not two); root may mount, others skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)
