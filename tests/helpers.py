"""Helpers shared by tests: the CLI in a fresh interpreter, tiny run configs, a frozen endpoint."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment with the repo first on the path and no RAY_ADDRESS (never the session's Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"PYTHONPATH": str(REPO), **(extra or {})})
    return env


def cli(args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300,
        **popen: Any) -> subprocess.CompletedProcess:
    """`thalia-ray ARGS` in a fresh interpreter; returns the finished process (any exit code)."""
    return subprocess.run([sys.executable, "-m", "thalia_ray.cli", *args], env=cli_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **popen)


def tiny_train_config(path: Path, data_root: Path, store: Path, **train: Any) -> Path:
    """A one-worker CPU run of a few steps on `data_root`, written as YAML to `path`."""
    cfg = {
        "name": "tiny",
        "data": {"root": str(data_root), "crop": 32, "samples_per_read_task": 32},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 1, "cpus_per_worker": 1, "max_steps_per_epoch": 1,
                  "max_failures": 0, "test_best": False, **train},
        "storage": {"store": str(store)},
        "runtime": {"num_cpus": 2, "object_store_memory": 100_000_000, "wandb": {"mode": "disabled"}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """An 'S3 endpoint' on 127.0.0.1 that accepts every connection and never sends a byte (a frozen
    server); yields its URL. Connections are held open until the block ends."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
