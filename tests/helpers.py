"""Helpers shared by test modules (fixtures live in conftest.py): the CLI in a fresh interpreter, tiny run
configs, endpoints that freeze or go away, stored runs, tracking outputs read back with each tracker's
own reader, hand-made cubes and dataset roots whose values are known, and published-style shards."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import get_cache, read_sample
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.locations import DataLocations
from thalia_ray.ray_internals import ExecutionCallback
from thalia_ray.storage import S3Options, local

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
                      storage: Mapping[str, Any] | None = None, sections: Mapping[str, Mapping[str, Any]] | None = None,
                      **train: Any) -> Path:
    """A one-worker CPU run of a few steps on `data_root`, written as YAML to `path`; `sections` adds to
    (or replaces keys of) whole sections, e.g. {"pretrain": {...}, "data": {"crop": 64}}."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "data": {"root": str(data_root), "crop": 32, "samples_per_read_task": 32},
        "model": {"name": model},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 1, "cpus_per_worker": 1, "max_steps_per_epoch": 1,
                  "max_failures": 0, "test_best": False, **train},
        "storage": {"store": str(store), **(storage or {})},
        "runtime": {"num_cpus": 2, "object_store_memory": 100_000_000, "wandb": {"mode": "disabled"}},
    }
    for section, values in (sections or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def checkpoint_registered(store: Any, run_id: str) -> bool:
    """Ray's controller has registered a checkpoint of the run: its snapshot, which a rerun resumes from, is stored.

    The controller collects a report at its next poll (every 2 s) and writes the snapshot then, so an epoch in
    the history does not yet mean a checkpoint to resume from: a fault that should be resumed from waits for this.
    """
    from thalia_ray.ray_internals import TRAIN_SNAPSHOT as RAY_SNAPSHOT

    try:
        return store.ray_root.join(run_id, RAY_SNAPSHOT).exists()
    except Exception:  # noqa: BLE001 - the store may be away: not there yet
        return False


def check_resumed(record: Any, epochs: int) -> None:
    """A rerun finished every epoch once, from a checkpoint of the interrupted run (not from scratch)."""
    assert record.read_status()["status"] == "finished"
    assert [h["epoch"] for h in record.read_history()] == list(range(1, epochs + 1))
    assert record.read_results()["restarts"] == 1


@contextlib.contextmanager
def cli_driver(args: Sequence[str], log: Path) -> Iterator[subprocess.Popen]:
    """`thalia-ray ARGS` as a driver process in a session of its own, its output in `log`; every process of
    that session (the driver's Ray included) is ended on leaving."""
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "thalia_ray.cli", *args], env=cli_env(), cwd=REPO,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield driver
    finally:
        kill_session(driver.pid)


def kill_after_checkpoint(driver: subprocess.Popen, store: Any, run_id: str, log: Path) -> None:
    """SIGKILL the driver of `run_id` once Ray has registered a checkpoint of it (failing if it ended first)."""
    wait_for(lambda: checkpoint_registered(store, run_id) or driver.poll() is not None, 420,
             f"a registered checkpoint of run {run_id}")
    assert driver.poll() is None, log.read_text()[-3000:]
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_session(sid: int, grace_s: float = 10.0) -> None:
    """End every process of session `sid` (a `ray start --block` started with start_new_session)."""
    def members() -> list[int]:
        pids = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                alive = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                if alive and os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (OSError, IndexError):
                pass  # gone meanwhile
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while members() and time.time() < deadline:
            time.sleep(0.2)


class LimitRecorder(ExecutionCallback):
    """Records each execution's CPU limit at every scheduling step (in the process that runs them;
    Ray's workers import the class by name, so it lives here)."""

    seen: dict[int, list[float]] = {}

    def on_execution_step(self, executor) -> None:
        self.seen.setdefault(id(self), []).append(executor._resource_manager.get_global_limits().cpu)


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


def read_mlflow_runs(database: Path) -> dict[str, Any]:
    """Every run in an MLflow SQLite database, by run name, read with MLflow's own client:
    `{name: {"status", "params", "metrics": {name: [(step, value), ...]}}}`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = {}
    for run in client.search_runs(experiments):
        history = {name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
                   for name in run.data.metrics}
        runs[run.info.run_name] = {"status": run.info.status, "params": run.data.params, "metrics": history}
    return runs


def read_wandb_run(path: Path) -> dict[str, Any]:
    """A W&B offline run file (`run-ID.wandb`) decoded with W&B's own record protocol: its config,
    history rows, summary and exit code. The file is W&B's log format: a 7-byte header, then 32 KiB
    blocks of chunks (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last), each record a
    `wandb_internal_pb2.Record`."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending = 32768, 7, b""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record.FromString(pending)
        pending = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            run["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif which == "history":
            row = {key(i): json.loads(i.value_json) for i in record.history.item}
            run["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        elif which == "summary":
            run["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif which == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def assert_report_renders(page, min_images: int = 1) -> None:
    """Open a written report (a storage Location) in headless Chromium: no console errors, every image
    decodes, the screenshot (saved beside the page, in the store) is not blank."""
    from PIL import Image

    from thalia_ray.report.browser import SCREENSHOT, screenshot_beside

    shot = screenshot_beside(page)  # raises BrowserError naming console errors and undecoded images
    assert shot == page.parent().join(SCREENSHOT)
    pixels = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    low, high = pixels.getextrema()
    assert high - low > 100 and pixels.height > 1000, "the screenshot is blank or cut short"
    assert page.read_text().count("<img ") >= min_images


def assert_tracked(record, epochs: int, killed: bool = False) -> None:
    """A run's W&B, TensorBoard and MLflow records, in its store (local or S3), hold every epoch of its
    history and, for a finished run, its test metrics. `killed`: a sweep scheduler stopped the run, whose
    live TensorBoard may also hold the epoch it was cut in (tracked, then killed before the history
    committed it), but never misses one; W&B and MLflow are written from the history, so match it."""
    import tempfile

    from thalia_ray.train.mlflow_store import DATABASE
    from thalia_ray.train.tracking import TRACKING, FolderSync

    history = record.read_history()
    assert len(history) == epochs, (len(history), epochs)
    results = record.read_results()
    tested = {k: v for k, v in (results or {}).get("metrics", {}).items() if k.startswith("test/")}
    assert not (killed and tested), f"a stopped run has test metrics {tested}"
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch)
        FolderSync(local, record.loc.join(TRACKING)).restore()  # a copy, wherever the store is
        runs = list(local.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(runs) == 1, f"expected one W&B run under {record.loc}, found {runs}"
        wandb = read_wandb_run(runs[0])
        assert wandb["exit_code"] == 0 and wandb["config"]["train"]["lr"] == record.read_config().train.lr
        assert [row["val/loss"] for row in wandb["history"]] == [row["val/loss"] for row in history]
        assert {k: wandb["summary"][k] for k in tested} == tested
        scalars = read_tensorboard_scalars(local / "tensorboard")
        points = scalars["val/loss"]
        assert len(points) in ([epochs, epochs + 1] if killed else [epochs]), (points, history)
        assert [step for step, _ in points] == list(range(1, len(points) + 1)), points
        assert [v for _, v in points[:epochs]] == pytest.approx([row["val/loss"] for row in history], rel=1e-6)
        assert {k: scalars[k][-1][1] for k in tested} == pytest.approx(tested, rel=1e-6)
        store_tracking = record.loc.parent().parent().join(TRACKING, DATABASE)
        (local / DATABASE).write_bytes(store_tracking.read_bytes())
        mlflow = read_mlflow_runs(local / DATABASE)[record.run_id]
        assert mlflow["status"] == ("KILLED" if killed else "FINISHED")
        assert mlflow["metrics"]["val/loss"] == [(i + 1, row["val/loss"]) for i, row in enumerate(history)]
        assert {k: mlflow["metrics"][k][-1][1] for k in tested} == tested  # MLflow keeps full precision
        assert mlflow["params"]["train.lr"] == str(record.read_config().train.lr)


# ------------------------------------------------------------ hand-made cubes of known values
FRAME = "021D_09150_131313"
PRIMARIES = ["20190101", "20190113"]
SECONDARIES = ["20190113", "20190125", "20190206"]
HEIGHT, WIDTH, CHUNK = 32, 40, 8
VAR_OFFSET = {name: 0.25 * i for i, name in enumerate(schema.ALL_CHANNELS)}


def known_value(variable: str, p: int, s: int, row, col):
    """The value every test cube holds at (primary p, secondary s, row, col): exact in float32."""
    return p * 1_000_000 + s * 100_000 + row * 100 + col + VAR_OFFSET[variable]


def cube_dataset(masks: dict[tuple[int, int], np.ndarray] | None = None) -> xr.Dataset:
    """A 2×3-pair cube with spatial dims named `rows`/`cols` (readers must not assume y/x)."""
    p, s, r, c = np.meshgrid(np.arange(2), np.arange(3), np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    dims = (schema.PRIMARY_DIM, schema.SECONDARY_DIM, "rows", "cols")
    data = {
        name: (dims, known_value(name, p, s, r, c).astype(np.float32))
        for name in schema.ALL_CHANNELS if name != "dem"
    }
    data["dem"] = (("rows", "cols"), known_value("dem", 0, 0, r[0, 0], c[0, 0]).astype(np.float32))
    mask = np.zeros((2, 3, HEIGHT, WIDTH), dtype=np.uint8)
    for (pi, si), m in (masks or {}).items():
        mask[pi, si] = m
    data[schema.MASK_VAR] = (dims, mask)
    coords = {
        schema.PRIMARY_DIM: pd.to_datetime(PRIMARIES).values,
        schema.SECONDARY_DIM: pd.to_datetime(SECONDARIES).values,
    }
    return xr.Dataset(data, coords=coords)


def write_cube(root: str, frame: str = FRAME, masks=None, dataset: xr.Dataset | None = None,
               chunk: tuple[int, int, int, int] = (1, 1, CHUNK, CHUNK)) -> None:
    """`{root}/{frame}.zarr`: `dataset`, else the known-value cube with `masks`, stored in `chunk` chunks."""
    ds = dataset if dataset is not None else cube_dataset(masks)
    encoding = {v: {"chunks": chunk if ds[v].ndim == 4 else chunk[2:]} for v in ds.data_vars}
    store = local(root).join(f"{frame}.zarr").zarr_store(read_only=False)
    ds.to_zarr(store, mode="w", encoding=encoding, consolidated=False, write_empty_chunks=True)


def record(uid: int, primary: str, secondary: str, positive: bool, polygons=(), frame=FRAME, **extra):
    """One raw annotation record as published (fields overridden by `extra`)."""
    raw = {
        "uniqueID": uid, "frameID": frame, "primary_date": primary, "secondary_date": secondary,
        "label": ["Deformation"] if positive else ["Non_Deformation"],
        "activity_type": ["Sill"] if positive else [], "intensity_level": ["Medium"] if positive else [],
        "phase": "Unrest" if positive else "Rest", "confidence": 0.8, "segmentation_mask": [list(p) for p in polygons],
        "caption": "", **{f: 0 for f in schema.FLAGS},
    }
    raw.update(extra)
    return raw


# ------------------------------------------------------------------ a tiny dataset root
ROOT_FRAMES = ("021D_09150_131313", "128A_09016_110500")
# (primary, secondaries): train 2018, val 2019-07, test 2020-03
ROOT_GROUPS = [
    ("20180105", ["20180111", "20180117", "20180123"]),
    ("20180117", ["20180123", "20180129", "20180204"]),
    ("20180129", ["20180204", "20180210", "20180216"]),
    ("20180210", ["20180216", "20180222", "20180228"]),
    ("20190705", ["20190711", "20190717", "20190723"]),
    ("20200310", ["20200316", "20200322", "20200328"]),
]
ROOT_SIZE, ROOT_CHUNK = 40, 16
ROOT_BOX = (10, 12, 19, 21)  # row0, col0, row1, col1 of the deformation of positive members


def _root_record(uid: int, frame: str, primary: str, secondary: str, positive: bool) -> dict:
    r0, c0, r1, c1 = ROOT_BOX
    return {
        "uniqueID": uid, "frameID": frame, "primary_date": primary, "secondary_date": secondary,
        "label": ["Deformation"] if positive else ["Non_Deformation"],
        "activity_type": ["Mogi"] if positive else [], "intensity_level": ["High"] if positive else [],
        "phase": "Unrest" if positive else "Rest", "confidence": 0.9,
        "segmentation_mask": [[c0, r0, c1, r0, c1, r1, c0, r1]] if positive else [],
        "is_crowd": 0, "caption": f"sample {uid}", **{f: 0 for f in schema.FLAGS},
    }


def _root_cube(frame_index: int, positives: set[tuple[str, str]], frame: str) -> xr.Dataset:
    primaries = sorted({p for p, _ in ROOT_GROUPS})
    secondaries = sorted({s for _, ss in ROOT_GROUPS for s in ss})
    rng = np.random.default_rng(frame_index)
    shape = (len(primaries), len(secondaries), ROOT_SIZE, ROOT_SIZE)
    dims = (schema.PRIMARY_DIM, schema.SECONDARY_DIM, "y", "x")
    data = {name: (dims, rng.normal(size=shape).astype(np.float32)) for name in schema.ALL_CHANNELS if name != "dem"}
    data["dem"] = (("y", "x"), rng.normal(size=(ROOT_SIZE, ROOT_SIZE)).astype(np.float32))
    mask = np.zeros(shape, dtype=np.uint8)
    r0, c0, r1, c1 = ROOT_BOX
    for p, s in positives:
        mask[primaries.index(p), secondaries.index(s), r0:r1 + 1, c0:c1 + 1] = 1 + (len(positives) % 2)
    data[schema.MASK_VAR] = (dims, mask)
    coords = {schema.PRIMARY_DIM: pd.to_datetime(primaries).values,
              schema.SECONDARY_DIM: pd.to_datetime(secondaries).values}
    return xr.Dataset(data, coords=coords)


def delete_pair_chunks(root: str, sample, variable: str = "insar_difference") -> None:
    """Damage a cube: every chunk of `variable` for the sample's (first) pair."""
    cube = Path(root, f"{sample.frame_id}.zarr")
    with xr.open_zarr(cube, consolidated=False) as ds:
        dates = {dim: list(ds.indexes[dim].strftime("%Y%m%d")) for dim in (schema.PRIMARY_DIM, schema.SECONDARY_DIM)}
    p = dates[schema.PRIMARY_DIM].index(sample.primary_date)
    s = dates[schema.SECONDARY_DIM].index(sample.secondary_dates[0])
    chunks = [c for c in (cube / variable / "c" / str(p) / str(s)).rglob("*") if c.is_file()]
    assert chunks
    for chunk in chunks:
        chunk.unlink()


def local_locations(data_cfg: DataConfig) -> DataLocations:
    """The locations of a configuration whose data are on local disk (no storage settings apply)."""
    return DataLocations.of(data_cfg, S3Options())


def upload_folder(local: str | Path, url: str) -> None:
    """Every file under `local` as an object under `url` (`s3://bucket/prefix`) of the endpoint in the
    environment (the moto server), a few at a time: moto answers one request in a few milliseconds."""
    import boto3

    client = boto3.client("s3")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")

    def put(path: Path) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, [path for path in Path(local).rglob("*") if path.is_file()]))


def build_root(root: str | Path, chunk: int = ROOT_CHUNK) -> str:
    """A tiny dataset root: two 40×40 frames, 36 annotated pairs (train 24, val 6, test 6), about a
    quarter positive, with cubes, annotations, time-series index and statistics. Frames are stored in
    `chunk`² chunks (the default puts a crop across several; `ROOT_SIZE` makes one file per frame,
    a ninth of the files, for tests that must upload the root object by object)."""
    root = str(root)
    annotations, timeseries, uid = {}, {}, 1
    for fi, frame in enumerate(ROOT_FRAMES):
        positives = set()
        timeseries[frame] = {}
        for gi, (primary, secondaries) in enumerate(ROOT_GROUPS):
            uids = []
            for si, secondary in enumerate(secondaries):
                positive = (gi + si + fi) % 4 == 0
                annotations[str(uid)] = _root_record(uid, frame, primary, secondary, positive)
                if positive:
                    positives.add((primary, secondary))
                uids.append(uid)
                uid += 1
            timeseries[frame][primary] = {"length": 3, "secondary_date": secondaries, "uniqueID": uids}
        ds = _root_cube(fi, positives, frame)
        chunks = (1, 1, chunk, chunk)
        encoding = {v: {"chunks": chunks if ds[v].ndim == 4 else chunks[2:]} for v in ds.data_vars}
        ds.to_zarr(local(root).join(f"{frame}.zarr").zarr_store(read_only=False), mode="w",
                   encoding=encoding, consolidated=False, write_empty_chunks=True)
    base = local(root)
    base.join(schema.ANNOTATIONS_FILE).write_json(annotations)
    base.join(schema.TIMESERIES_FILE).write_json(timeseries)
    stats = {schema.statistics_key(c): {"mean": 0.1, "std": 2.0} for c in schema.ALL_CHANNELS}
    base.join(schema.STATISTICS_FILE).write_json(stats)
    return root


# --------------------------------------------------------------------- published-style shards
class Payload:
    """A pickle whose loading would run code: must be refused by weights_only loading."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/thalia-pwned",))


def torch_bytes(obj) -> bytes:
    """`obj` as the bytes `torch.save` writes (the published shards' member format)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def published_sample(index: SampleIndex, sample, data_cfg: DataConfig) -> dict[str, bytes]:
    """The sample's members as the reference exporter writes them: `torch.save` of the image
    (T·C, H, W) float32 of all nine channels (its default), the labels (T, H, W) int64 with
    earthquake 2 → 1, and the sample dict (frame_id, raw annotation records, per-member labels)."""
    import torch

    raw = read_sample(sample, index.annotations, get_cache(data_cfg.root), data_cfg, channels=schema.ALL_CHANNELS)
    annotations = [index.annotations[u] for u in sample.unique_ids]
    info = {"frame_id": sample.frame_id,
            "annotation": [_root_record(u, a.frame_id, a.primary_date, a.secondary_date, a.positive)
                           for u, a in zip(sample.unique_ids, annotations)],
            "label": [a.positive for a in annotations],
            "annotation_path": [f"annotations/{u}.json" for u in sample.unique_ids]}
    image = torch.from_numpy(raw.image.reshape(-1, *raw.image.shape[2:]).copy())
    labels = torch.from_numpy(np.where(raw.mask == 2, 1, raw.mask).astype(np.int64))
    return {"image.pth": torch_bytes(image), "labels.pth": torch_bytes(labels), "sample.pth": torch_bytes(info)}


def write_published(root: str, data_cfg: DataConfig, split: str, per_shard: int = 4, writers: int = 2,
                    malicious_key: str | None = None) -> list[str]:
    """The split as the reference exporter writes it: `writers` webdataset.ShardWriters, writer w
    taking samples w, w + writers, ..., keyed `sample{index:06d}`, train sorted into `train_pos` /
    `train_neg` by any positive member, into `{root}/{T}/{folder}/sample-{folder}-{w}-NNNNNN.tar`,
    then renamed `sample-{folder}-NNNNNN.tar` as the published copies are. Returns the keys in
    index order. With `malicious_key`, one extra sample's sample.pth holds a `__reduce__` payload,
    written last by writer 0."""
    import webdataset

    index = SampleIndex.from_config(data_cfg, 0)
    items = [(f"sample{i:06d}", published_sample(index, s, data_cfg), any(s.member_positive))
             for i, s in enumerate(index.samples(split))]
    folders = ("train_pos", "train_neg") if split == "train" else (split,)
    base = Path(root, str(data_cfg.length))
    for folder in folders:
        (base / folder).mkdir(parents=True, exist_ok=True)
    for w in range(writers):
        sinks = {f: webdataset.ShardWriter(str(base / f / f"sample-{f}-{w}-%06d.tar"), maxcount=per_shard, verbose=0)
                 for f in folders}
        for key, members, positive in items[w::writers]:
            sinks[folders[0] if positive or split != "train" else folders[1]].write({"__key__": key, **members})
        if malicious_key and w == 0:
            payload = torch_bytes({"frame_id": Payload(), "label": [True]})
            sinks[folders[0]].write({"__key__": malicious_key, **dict(items[0][1], **{"sample.pth": payload})})
        for sink in sinks.values():
            sink.close()
    for folder in folders:
        for n, tar in enumerate(sorted((base / folder).glob("*.tar"))):
            tar.rename(base / folder / f"sample-{folder}-{n:06d}.tar")
    return [key for key, _, _ in items]


def bad_checkpoint(path: Path, content: str, marker: Path) -> None:
    """A `state.pt` that is not a checkpoint: `payload` (a pickle whose `__reduce__` would create `marker`
    if it ever ran), `random` bytes, or a real checkpoint `truncated` to its first 300 bytes."""
    import torch

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "payload":
        torch.save({"model": Payload()}, path)
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        torch.save({"model": {"weight": torch.zeros(64, 64)}}, path)
        path.write_bytes(path.read_bytes()[:300])


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: ~600 bytes that expand to 9**levels strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"
