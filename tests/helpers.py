"""Helpers shared by test modules (fixtures live in conftest.py): the CLI in a fresh interpreter, tiny run
configs, endpoints that freeze or go away, stored runs, and tracking outputs read back with each tracker's
own reader."""
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

import pytest
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

def stored_run(store_dir: Path, data_root: Path, task: str = "segmentation", seed: int = 0,
               **data: Any) -> tuple[Any, str]:
    """A finished run (unet or resnet18, 32-px crop) whose best checkpoint holds the seeded initial
    weights: inference and export read it exactly like a trained one, without minutes of Ray Train."""
    from thalia_ray.bench.predict import untrained_run
    from thalia_ray.config import ThaliaConfig

    cfg = ThaliaConfig.model_validate({
        "name": f"infer-{task}", "seed": seed,
        "data": {"root": str(data_root), "crop": 32, **data},
        "model": {"task": task, "name": "unet" if task == "segmentation" else "resnet18"},
        "train": {"batch_size": 8, "num_workers": 1, "cpus_per_worker": 0.5},
        "storage": {"store": str(store_dir)}, "runtime": {"wandb": {"mode": "disabled"}},
    })
    return untrained_run(str(store_dir), cfg, seed)


def read_tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under `folder`, as (step, value), via TensorBoard."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(folder))
    mux.Reload()
    series: dict[str, list[tuple[int, float]]] = {}
    for run, tags in mux.Runs().items():
        for tag in tags.get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in mux.Scalars(run, tag))
    return {tag: sorted(points) for tag, points in series.items()}


def read_mlflow_metrics(folder: Path, run_name: str) -> dict[str, list[tuple[int, float]]]:
    """The metric histories of the MLflow run `run_name` in the file store `folder`, via MLflow's client."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=Path(folder).as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, f"expected one MLflow run named {run_name}, found {len(runs)}"
    run_id = runs[0].info.run_id
    return {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
            for name in runs[0].data.metrics}


def assert_report_renders(page, min_images: int = 1) -> None:
    """Open a written report (a storage Location) in headless Chromium: no console errors, every image
    decodes, the screenshot (saved beside the page, in the store) is not blank."""
    import io

    from PIL import Image

    from thalia_ray.report.browser import SCREENSHOT, screenshot_beside

    shot = screenshot_beside(page)  # raises BrowserError naming console errors and undecoded images
    assert shot == page.parent().join(SCREENSHOT)
    pixels = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    low, high = pixels.getextrema()
    assert high - low > 100 and pixels.height > 1000, "the screenshot is blank or cut short"
    assert page.read_text().count("<img ") >= min_images


def assert_tracked(record, epochs: int) -> None:
    """A run's W&B, TensorBoard and MLflow files are in its own store folder (local or S3) and hold every epoch."""
    import tempfile

    from thalia_ray.train.tracking import TRACKING, FolderSync

    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        FolderSync(local, record.loc.join(TRACKING)).restore()  # a copy, wherever the store is
        assert list(local.glob("wandb/offline-run-*/run-*.wandb")), f"no W&B run under {record.loc}"
        history = [row["val/loss"] for row in record.read_history()]
        expected = list(zip(range(1, epochs + 1), history))
        tensorboard = read_tensorboard_scalars(local / "tensorboard")["val/loss"]
        assert [step for step, _ in tensorboard] == list(range(1, epochs + 1))
        assert [v for _, v in tensorboard] == pytest.approx(history, rel=1e-6)  # float32 in event files
        assert read_mlflow_metrics(local / "mlflow", record.run_id)["val/loss"] == expected
