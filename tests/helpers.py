"""Helpers shared by tests: the CLI in a fresh interpreter, tiny run configs, endpoints that freeze or go away."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

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


def tiny_train_config(path: Path, data_root: Path, store: str | Path, *, model: str = "resnet18",
                      storage: Mapping[str, Any] | None = None, **train: Any) -> Path:
    """A one-worker CPU run of a few steps on `data_root`, written as YAML to `path`."""
    cfg = {
        "name": "tiny",
        "data": {"root": str(data_root), "crop": 32, "samples_per_read_task": 32},
        "model": {"name": model},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 1, "cpus_per_worker": 1, "max_steps_per_epoch": 1,
                  "max_failures": 0, "test_best": False, **train},
        "storage": {"store": str(store), **(storage or {})},
        "runtime": {"num_cpus": 2, "object_store_memory": 100_000_000, "wandb": {"mode": "disabled"}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of `target_port`: `cut()` drops every connection and refuses
    new ones (the store is gone), `restore()` listens again on the same port (it is back)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        assert self.server is not None
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (Linux), freeing the port
        self.server.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client = server.accept()[0]
            except OSError:
                return  # cut
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


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
