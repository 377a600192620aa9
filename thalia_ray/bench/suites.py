"""The benchmark suites: name → what it compares, its sizes, and the function that measures it.

Every suite runs the project's path and the baseline a user would otherwise have (the original
research code's strategy, or a bare PyTorch loop) in the same process, interleaved by the harness.
Sizes come in presets (`small` runs in minutes on a 2-core laptop) and single parameters can be
overridden (`--param crop=96`). Data is synthesised into a temporary folder for each run.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from thalia_ray.bench import harness
from thalia_ray.bench.harness import BenchResult, Rep, SuiteUnavailable, interleave, ratio, timed_rate
from thalia_ray.bench.reference import reference_suite

Params = dict[str, Any]
SuiteFn = Callable[[Params, int, BenchResult], None]


@dataclass(frozen=True)
class Suite:
    name: str
    summary: str
    run: SuiteFn
    presets: Mapping[str, Params]
    repeats: int = 5
    needs_ray: bool = True
    precheck: Callable[[], Any] | None = None  # raises SuiteUnavailable before any work starts


@dataclass
class BenchOptions:
    size: str = "small"
    repeats: int | None = None  # None: the suite's default
    params: dict[str, Any] = field(default_factory=dict)  # overrides of single preset values


# ------------------------------------------------------------------------------------ data
def _synthesize(workdir: str, p: Params) -> str:
    from thalia_ray.synthetic.generator import synthesize

    root = f"{workdir}/data"
    synthesize(root, frames=p["frames"], size=p["size"], seed=p.get("seed", 0), max_groups_per_frame=p["groups"])
    return root


def _data_cfg(root: str, p: Params) -> Any:
    from thalia_ray.config import DataConfig

    return DataConfig.model_validate({"root": root, "length": p["length"], "crop": p["crop"]})


def _samples(tmp: str, p: Params) -> tuple[str, Any, Any, list[Any]]:
    """A fresh synthetic dataset in `tmp`: (root, data config, index, the first p["samples"] samples)."""
    from thalia_ray.data.index import SampleIndex

    root = _synthesize(tmp, p)
    data_cfg = _data_cfg(root, p)
    index = SampleIndex.from_config(data_cfg, 0)
    samples = [s for split in ("train", "val", "test") for s in index.samples(split)][:p["samples"]]
    return root, data_cfg, index, samples


# ------------------------------------------------------------------------------------ suites
def cube_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Windowed reads (cube opened once, only the crop's chunks) vs per-sample open + whole frames."""
    from thalia_ray.bench import pipeline as pl
    from thalia_ray.data.cube import CubeCache

    with tempfile.TemporaryDirectory() as tmp:
        root, data_cfg, index, samples = _samples(tmp, p)
        cache = CubeCache(root)
        reps = interleave({
            "windowed": timed_rate(lambda: sum(1 for s in samples if pl.windowed_read(s, index, data_cfg, cache).size)),
            "per-sample": timed_rate(lambda: sum(1 for s in samples if pl.original_read(s, index, data_cfg).size)),
        }, repeats)
    project = result.add("cube windowed reads", "samples/s", reps["windowed"])
    baseline = result.add("per-sample open, whole frames", "samples/s", reps["per-sample"])
    why = (f"frames of {p['size']}² are small next to the {p['crop']}² crop, so whole-frame reads cost little "
           "more than windows; the gap grows with frame size (try --param size=512)")
    result.ratios.append(ratio("windowed vs per-sample", project, baseline, 5.0, why))
    result.notes.append(f"{len(samples)} samples, T={p['length']}, crop {p['crop']}², frames {p['size']}²")


def shards_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Our shards vs the published `.pth` members through `torch.load`: the same samples (evaluation
    crop, configured channels), both read by ranged reads and decoded to the same RawSample."""
    import ray

    from thalia_ray.bench import pipeline as pl
    from thalia_ray.data.cube import get_cache, read_sample
    from thalia_ray.data.shards.npy import sample_members
    from thalia_ray.data.shards.tar import ShardEntry, write_tar
    from thalia_ray.storage import local

    with tempfile.TemporaryDirectory() as tmp:
        _, data_cfg, index, samples = _samples(tmp, p)
        channels = list(data_cfg.channels)
        raws = [read_sample(s, index.annotations, get_cache(data_cfg.root), data_cfg) for s in samples]
        dtype = p.get("dtype", "float32")
        own = write_tar(f"{tmp}/own.tar", [(r.key, sample_members(r, dtype, False)) for r in raws])
        own_entries = [ShardEntry(k, local(f"{tmp}/own.tar"), off, size, 0, i) for i, (k, off, size) in enumerate(own)]
        published = pl.published_tar(f"{tmp}/published.tar", raws, data_cfg)
        reps = interleave({
            "own": timed_rate(lambda: pl.read_own(own_entries, channels, channels)),
            "published": timed_rate(lambda: pl.read_published(published, data_cfg)),
        }, repeats)
        fresh = ray.remote(num_cpus=0.25, max_calls=1)(pl.stream_peak_rss)  # a new worker per measurement
        memory = {n: ray.get(fresh.remote(own_entries * n, channels, data_cfg.samples_per_block))
                  for n in (1, 4)}
    project = result.add(f"own shards (.npy, {dtype})", "samples/s", reps["own"])
    baseline = result.add("published shards (torch.load .pth)", "samples/s", reps["published"])
    result.ratios.append(ratio("own vs pickled shards", project, baseline, 3.0,
                               "the tensors dominate at this crop and both formats read them as one block; "
                               "the pickled sample dict's cost is fixed per sample"))
    result.notes.append(f"{len(samples)} samples, crop {p['crop']}², T={p['length']}, channels {channels}")
    result.notes.append("streaming worker peak RSS: " + ", ".join(
        f"{n}× shards ({m['samples']} samples) {m['peak_rss_mib']:.0f} MiB" for n, m in memory.items()))


def _ingest_config(p: Params, root: str, tmp: str) -> Any:
    """The run config the pipeline suite streams: an existing dataset (`data=`) or a fresh synthetic
    one; for `source=shards`, an existing export (`shards=`) or one exported now."""
    from thalia_ray.config import load_config
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.shards.export import export_shards
    from thalia_ray.runtime import usable_cpus
    from thalia_ray.storage import S3Options

    cpus = p["cpus"] or usable_cpus()
    overrides = [f"data.root={root}", f"data.length={p['length']}", f"data.crop={p['crop']}",
                 f"data.balance={p['balance']}", *([f"data.samples_per_block={p['block']}"] if p["block"] else []),
                 "data.atmospheric=[]",  # the three geomorphology channels
                 f"train.batch_size={p['batch_size']}", f"runtime.data_cpu_limit={cpus}"]
    cfg = load_config(None, overrides)
    if p["source"] == "shards":
        out = p["shards"] or f"{tmp}/shards"
        if not p["shards"]:
            export_shards(cfg.data, DataLocations.of(cfg.data, S3Options.of(cfg.storage)), out, length=p["length"],
                          splits=("train",))
        cfg = load_config(None, [*overrides, "data.source=shards", f"data.shards={out}"])
    return cfg


def pipeline_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Ray Data into a `streaming_split` consumer vs a DataLoader with as many persistent workers as the
    data may use, both running the pipeline's own plan and per-sample work (thalia_ray.bench.ingest)."""
    from thalia_ray.bench import ingest

    with tempfile.TemporaryDirectory() as tmp:
        root = p["data"] or _synthesize(tmp, p)
        cfg = _ingest_config(p, root, tmp)
        cpus = int(cfg.runtime.data_cpu_limit)
        data, ray_run, runs = _ray_runs(cfg, p["epochs"])
        source = ingest.detached(data.sources["train"])
        plan = ingest.EpochPlan()
        loader = ingest.make_loader(cpus, plan)

        def loader_run() -> Rep:
            return ingest.timed_run(ingest.loader_run(loader, plan, source, next(runs), cfg.train.batch_size))

        reps = interleave({"ray": ray_run, "loader": loader_run}, repeats)
    name = f"{cfg.data.source} source"
    runs_of = f"runs of {p['epochs']} epochs"
    ray_all = result.add(f"Ray Data ({name}), {runs_of} incl. start-up", "samples/s", reps["ray"])
    base_all = result.add(f"DataLoader, {cpus} persistent workers, {runs_of} incl. start-up", "samples/s", reps["loader"])
    ray_steady = result.add("Ray Data, steady (after the run's first batch)", "samples/s", _extra(reps["ray"], "steady"))
    base_steady = result.add("DataLoader, steady (after the run's first batch)", "samples/s", _extra(reps["loader"], "steady"))
    per_core = result.add("Ray Data steady per data CPU", "samples/s/CPU",
                          [Rep(r.extra["steady"] / cpus, r.wall_s) for r in reps["ray"]])
    result.ratios += [
        ratio("pipeline vs DataLoader, steady", ray_steady, base_steady, 1.0,
              "Ray's own processes (split coordinators, raylet, stats) on the readers' cores (BENCHMARKS.md, issue 13)"),
        ratio("pipeline vs DataLoader, incl. start-up", ray_all, base_all, 0.9,
              "a run's first epoch plans and starts a Ray Data execution before its first batch"),
    ]
    first = {n: harness.spread([r.extra["first_batch_s"] for r in reps[n]]).median for n in ("ray", "loader")}
    result.notes.append(f"{data.sizes['train']} samples per epoch ({name}), T={p['length']}, crop {p['crop']}², "
                        f"batch {p['batch_size']} (a DataLoader item), Ray Data blocks of {cfg.data.samples_per_block} in read "
                        f"tasks of {data.sources['train'].samples_per_task}, {cpus} data CPUs each side; first batch after "
                        f"{first['ray']:.2f} s (Ray Data) vs {first['loader']:.2f} s (DataLoader)")
    if cfg.data.source == "shards":
        _decode_limit(cfg, source, per_core, result)


def _ray_runs(cfg: Any, epochs: int, source: Any = None) -> tuple[Any, Callable[[], Rep], Iterator[list[int]]]:
    """(datasets, one timed run of `epochs` consecutive epochs of the train split into `streaming_split`
    consumers of its lanes, the runs' epoch numbers: every run, of either side, gets fresh epochs).
    `source`: another sample source than the config's (pretraining's)."""
    from thalia_ray.bench import ingest
    from thalia_ray.data.pipeline import EpochLanes, build_datasets

    data = build_datasets(cfg, splits=("train",), source=source)
    shards = {name: ds.streaming_split(1, equal=True)[0] for name, ds in data.datasets.items()}
    lanes = EpochLanes(data.epoch_control, shards.__getitem__, cfg.train.batch_size, cfg.data.prefetch_batches)
    runs = (list(range(start, start + epochs)) for start in range(0, 10**9, epochs))

    def run() -> Rep:
        return ingest.timed_run(ingest.ray_run(lanes, next(runs)))

    return data, run, runs


def cluster_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """The pipeline on a multi-node `ray.cluster_utils.Cluster` (nodes on this machine): one worker node
    vs `nodes` worker nodes of `node_cpus` CPUs each, every node started with the service's worker reuse."""
    from ray.cluster_utils import Cluster

    from thalia_ray import runtime
    from thalia_ray.config import RuntimeConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = p["data"] or _synthesize(tmp, p)
        rates: dict[int, list[Rep]] = {}
        for nodes in (1, p["nodes"]):
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": False,
                **runtime.worker_reuse_config(nodes * p["node_cpus"])})
            try:
                for _ in range(nodes):
                    cluster.add_node(num_cpus=p["node_cpus"])
                cluster.wait_for_nodes()
                with runtime.start(RuntimeConfig(address=cluster.address, log_level="WARNING")):
                    cfg = _ingest_config({**p, "cpus": nodes * p["node_cpus"]}, root, tmp)
                    _, ray_run, _ = _ray_runs(cfg, p["epochs"])
                    rates[nodes] = interleave({"ray": ray_run}, repeats)["ray"]
            finally:
                cluster.shutdown()
    one = result.add(f"1 worker node × {p['node_cpus']} CPU", "samples/s", rates[1])
    many = result.add(f"{p['nodes']} worker nodes × {p['node_cpus']} CPU", "samples/s", rates[p["nodes"]])
    result.ratios.append(ratio(f"{p['nodes']} nodes vs 1", many, one))
    result.notes.append(f"cube source, T={p['length']}, crop {p['crop']}², batch {p['batch_size']}; all nodes share "
                        "this machine's cores, so the ratio shows the pipeline spreading over nodes, not extra hardware")


def _extra(reps: list[Rep], key: str) -> list[Rep]:
    return [Rep(r.extra[key], r.wall_s) for r in reps]


def _decode_limit(cfg: Any, source: Any, per_core: Any, result: BenchResult) -> None:
    """Fraction of the raw decode limit: the single-core rate of the codec alone (member parsing and
    `.npy` decoding into owned arrays) over the bytes of one sample, against the pipeline's rate per CPU."""
    from thalia_ray.data.shards.npy import decode_own
    from thalia_ray.data.shards.tar import fetch_ranges, parse_members

    entries = source.items(0)[:256]
    fetched = [(e, bytes(b)) for e, b in fetch_ranges(entries)]
    shards = source.source  # OwnShards: the export's stored channels and compression
    start, nbytes = time.process_time(), 0
    for entry, blob in fetched:
        members = parse_members(blob, entry.where)[entry.key]
        raw = decode_own(members, entry.key, entry.where, cfg.data.channels, shards.stored_channels, shards.compressed)
        nbytes += np.ascontiguousarray(raw.image).nbytes + np.ascontiguousarray(raw.mask).nbytes
    seconds = time.process_time() - start
    limit = len(fetched) / seconds  # samples/s on one core for the codec alone
    fraction = per_core.stats.median / limit
    result.notes.append(f"raw decode limit: {nbytes / len(fetched) / 2**20:.2f} MiB per sample at "
                        f"{nbytes / seconds / 2**30:.2f} GiB/s on one core = {limit:,.0f} samples/s per core; "
                        f"the pipeline reaches {100 * fraction:.1f} % of it per data CPU (target ≥ 50 %)")


def e2e_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """`thalia-ray train` (Ray Train fed by the pipeline) vs a plain PyTorch script with the same model,
    batch, optimiser and threads whose DataLoader workers read the same cubes; samples/s = (train + val
    samples) / epoch seconds, median over the epochs after the first (which pays start-up on both sides)."""
    from thalia_ray.bench import ingest
    from thalia_ray.config import load_config
    from thalia_ray.data.pipeline import build_datasets
    from thalia_ray.runtime import usable_cpus
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.trainer import fit, steps_per_epoch

    loader_workers = p["loader_workers"] or usable_cpus()
    threads = max(1, int(p["cpus_per_worker"]))  # Ray Train gives a worker this many torch threads
    with tempfile.TemporaryDirectory() as tmp:
        root = p["data"] or _synthesize(tmp, p)
        overrides = [f"data.root={root}", f"data.length={p['length']}", f"data.crop={p['crop']}",
                     "data.atmospheric=[]", "data.augmentations=false", f"model.name={p['model']}",
                     "model.task=classification", f"train.batch_size={p['batch_size']}",
                     f"train.epochs={p['epochs']}",
                     "train.num_workers=1", f"train.cpus_per_worker={p['cpus_per_worker']}",
                     "train.max_steps_per_epoch=null", "train.test_best=false", "train.early_stopping.patience=null",
                     "runtime.wandb.mode=disabled", f"storage.store={tmp}/store"]
        if p["data_cpus"]:
            overrides.append(f"runtime.data_cpu_limit={p['data_cpus']}")
        cfg = load_config(None, overrides)
        data = build_datasets(cfg, splits=("train", "val"))
        sources = {split: ingest.detached(source) for split, source in data.sources.items()}
        steps = steps_per_epoch(cfg, data.sizes)

        def service() -> Rep:
            started = time.perf_counter()
            history = fit(cfg, store=ExperimentStore(f"{tmp}/store")).history
            rates = [float(row["time/samples_per_s"]) for row in history[1:]]
            return Rep(harness.spread(rates).median, time.perf_counter() - started, {"epochs": len(rates)})

        def plain() -> Rep:
            started = time.perf_counter()
            rates = ingest.plain_run(cfg, sources, steps, loader_workers, threads)[1:]
            return Rep(harness.spread(rates).median, time.perf_counter() - started, {"epochs": len(rates)})

        reps = interleave({"service": service, "plain": plain}, repeats, warmup=0)
    ours = result.add("thalia-ray train (Ray Train + Ray Data)", "samples/s", reps["service"])
    base = result.add(f"plain PyTorch script, DataLoader with {loader_workers} workers", "samples/s", reps["plain"])
    result.ratios.append(ratio("train vs plain script", ours, base, 0.9,
                               "the data path or Ray Train's per-epoch work (reports, checkpoints) costs more "
                               "than the script's"))
    result.notes.append(f"{data.sizes['train']} train / {data.sizes['val']} val samples per epoch, {steps} steps, "
                        f"{p['model']}, batch {p['batch_size']}, T={p['length']}, crop {p['crop']}², "
                        f"{threads} torch thread(s) each side, 1 Ray Train worker with {p['cpus_per_worker']} CPU; "
                        f"median over epochs 2–{p['epochs']} of each run")


def remote_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """`thalia-ray train` from a bucket at a distance vs the same run from local disk, and the plain
    PyTorch script's DataLoader reading the same bucket (thalia_ray.bench.remote)."""
    from thalia_ray import runtime
    from thalia_ray.bench import remote
    from thalia_ray.bench.proxy import Distance, ProxyProcess
    from thalia_ray.bench.s3server import S3Server
    from thalia_ray.config import RuntimeConfig
    from thalia_ray.runtime import usable_cpus

    latency = p["latency_ms"]
    with tempfile.TemporaryDirectory() as tmp:
        data = p["data"] or _synthesize(tmp, p)
        distance = Distance(latency_s=latency / 1000, bandwidth=p["bandwidth_mbs"] * 1e6)
        shards = p["shards"]
        with S3Server(remote.bucket_root(data, tmp, shards)) as server, ProxyProcess(server.port, distance) as proxy, \
                remote.credentials(server.credentials()), runtime.start(RuntimeConfig(log_level="WARNING")):
            runs: dict[str, list[remote.RunRates]] = {"local": [], "s3": [], "loader": []}
            cpu = {"server": 0.0, "proxy": 0.0}
            for i in range(repeats):
                base = remote.train_overrides(p, data, f"{tmp}/store", shards)
                s3 = [*remote.train_overrides(p, f"s3://{remote.BUCKET}", f"{tmp}/store",
                                              f"s3://{remote.SHARDS_BUCKET}" if shards else ""),
                      *remote.remote_overrides(proxy.url, f"{tmp}/cache-{i}" if p["cache"] else None)]
                if p["local"]:
                    runs["local"].append(remote.train_run(base, f"{tmp}/store"))
                before = server.cpu_s(), proxy.cpu_s()
                runs["s3"].append(remote.train_run(s3, f"{tmp}/store"))
                cpu["server"] += server.cpu_s() - before[0]
                cpu["proxy"] += proxy.cpu_s() - before[1]
                if p["baseline"]:
                    loader = [*s3[:-1], f"storage.cache.path={tmp}/loader-cache-{i}"] if p["cache"] else s3
                    runs["loader"].append(remote.loader_run(loader, p["loader_workers"] or usable_cpus(),
                                                            max(1, int(p["cpus_per_worker"]))))
    where = ("shards" if shards else "cubes") + f" from S3 +{latency:g} ms" + \
        (f", {p['bandwidth_mbs']:g} MB/s" if p["bandwidth_mbs"] else "") + (", node cache" if p["cache"] else ", no cache")
    series = {}
    for side, label in (("local", "local disk"), ("s3", f"train, {where}"), ("loader", f"plain script, DataLoader, {where}")):
        for part in ("first", "later"):
            if runs[side]:
                series[side, part] = result.add(f"{label}, {part} epoch{'s' if part == 'later' else ''}", "samples/s",
                                                [r.reps()[part] for r in runs[side]])
    for part in ("first", "later"):
        for field in ("requests", "bytes", "cache_hits"):
            result.add(f"{where}: {field.replace('_', ' ')} per sample, {part} epoch{'s' if part == 'later' else ''}",
                       "per sample", [Rep(r.per_sample(field, part == "later"), r.wall_s) for r in runs["s3"]],
                       higher_is_better=False)
    if runs["local"]:
        result.ratios += [
            ratio("later epochs from S3 vs local disk", series["s3", "later"], series["local", "later"],
                  0.9 if p["cache"] else None, "later epochs still fetch from the bucket (cache off or too small)"),
            ratio("first epoch from S3 vs local disk", series["s3", "first"], series["local", "first"],
                  0.5 if latency <= 50 else None, "the first epoch waits on the bucket: more requests in flight "
                  "(storage.requests_in_flight) or fewer per sample (rechunk)"),
        ]
    if runs["loader"]:
        result.ratios += [ratio(f"train vs plain script, same bucket, {part}", series["s3", part], series["loader", part])
                          for part in ("first", "later")]
    requests = sum(sum(t.requests for t in r.traffic) for r in runs["s3"])
    retries = sum(sum(t.retries for t in r.traffic) for r in runs["s3"])
    result.notes.append(f"server (rclone serve s3) {1e3 * cpu['server'] / max(1, requests):.2f} ms CPU per GET, proxy "
                        f"{1e3 * cpu['proxy'] / max(1, requests):.2f} ms CPU per GET over {requests:,} GETs of the "
                        f"train-from-S3 runs ({retries} retried)")
    result.notes.append(f"data {p['data'] or 'synthesised'}: T={p['length']}, crop {p['crop']}², batch {p['batch_size']}, "
                        f"{'balanced draw (fresh negatives every epoch)' if p['balance'] else 'every training sample every epoch'}, "
                        f"{p['model']}, 1 worker with {p['cpus_per_worker']} CPU, {p['epochs']} epochs of train + val per "
                        f"run; first = epoch 1, later = median of epochs 2–{p['epochs']}")


def train_step_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Ray Train (one worker, the project's WorkerLoop) vs a bare PyTorch loop, same model and batches."""
    import torch

    from thalia_ray.bench import train_step as ts
    from thalia_ray.runtime import usable_cpus

    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = ts.StepSetup(model=p["model"], task=p["task"], crop=p["crop"], length=p["length"],
                         batch_size=p["batch_size"], steps=p["steps"], warmup=p["warmup"],
                         threads=p["threads"] or usable_cpus(), device=device)
    batches = ts.make_batches(setup.config(), setup.steps)
    reps = interleave({"ray": lambda: ts.ray_rep(setup, batches), "bare": lambda: ts.bare_rep(setup, batches)},
                      repeats, warmup=0)
    ray_s = result.add("Ray Train step (1 worker)", "steps/s", reps["ray"])
    bare = result.add("bare PyTorch loop", "steps/s", reps["bare"])
    result.ratios.append(ratio("Ray Train vs bare loop", ray_s, bare, 0.9,
                               "per-step overhead of the worker (report polling, DDP wrapper) or CPU contention"))
    startup = ray_s.extra_stats("startup_s")
    if startup is not None:
        result.notes.append(f"Ray Train start-up (worker group until the loop runs), excluded above: "
                            f"median {startup.median:.1f} s (IQR {startup.iqr:.1f} s)")
    result.notes.append(f"{setup.model} {setup.task}, batch {setup.batch_size}, {setup.crop}², T={setup.length}, "
                        f"{setup.steps - setup.warmup} timed steps after {setup.warmup} warm-up, "
                        f"{setup.threads} threads each side, {device}")


def sweep_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """ASHA vs the full grid: worker-seconds to reach within 1 % of the grid's best validation F1."""
    from thalia_ray.bench import sweep as sw

    with tempfile.TemporaryDirectory() as tmp:
        root = _synthesize(tmp, p)
        setup = sw.SweepSetup(data_root=root, store=f"{tmp}/store", backbones=tuple(p["backbones"].split(",")),
                              lrs=tuple(float(v) for v in str(p["lrs"]).split(",")), epochs=p["epochs"],
                              crop=p["crop"], batch_size=p["batch_size"], max_steps_per_epoch=p["max_steps"])
        reps = interleave({"asha": lambda: sw.sweep_rep(setup, "asha"), "grid": lambda: sw.sweep_rep(setup, "fifo")},
                          repeats, warmup=0)
    asha = result.add("ASHA sweep", "worker-s", reps["asha"], higher_is_better=False)
    grid = result.add("full grid (FIFO)", "worker-s", reps["grid"], higher_is_better=False)
    pairs = sw.summarise_pairs(reps["asha"], reps["grid"])
    why = "" if pairs["all_reached"] else "ASHA stopped the trial that would have matched the grid's best"
    result.ratios.append(ratio("grid / ASHA worker-seconds", asha, grid, 1.0 if pairs["all_reached"] else None, why))
    for i, pair in enumerate(pairs["pairs"]):
        result.notes.append(f"repetition {i + 1}: best val F1 ASHA {pair['asha_best']:.3f}, grid {pair['grid_best']:.3f} "
                            f"→ {'within' if pair['reached'] else 'NOT within'} 1 % of the grid")
    if not pairs["all_reached"]:
        result.notes.append("the saving does not count where ASHA missed the grid's best (no target check)")
    result.notes.append(f"{len(setup.backbones)} backbones × {len(setup.lrs)} lrs, {setup.epochs} epochs, "
                        f"{setup.max_steps_per_epoch} steps/epoch, crop {setup.crop}²")


def synthetic_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Generator speed in series per CPU-second against the fixed target of `target_per_s` at 512², T=3.

    There is no slower code path a user would otherwise run, so the reference is a fixed target
    (issue #3: ≥ 10 series/s per core; docs/synthetic.md §6),
    not a measured baseline.
    """
    from thalia_ray.synthetic.bench import series_per_second

    def one() -> Rep:
        r = series_per_second(size=p["gen_size"], length=p["length"], repeats=p["series"])
        return Rep(r["series_per_second_per_core"], r["wall_seconds"], {"ms_per_series": r["ms_per_series"]})

    reps = interleave({"generator": one}, repeats, warmup=1)
    gen = result.add(f"generator {p['gen_size']}², T={p['length']}", "series/CPU-s", reps["generator"])
    target = p["target_per_s"]
    result.ratios.append(harness.Ratio("generator vs target", gen.name, f"{target:g} series/s per core",
                                       gen.stats.median / target, 1.0 if p["gen_size"] == 512 else None,
                                       "the generator is slower than the per-core target"))
    result.notes.append(f"{1000 / gen.stats.median:.0f} ms per series; the target is fixed, not a measured "
                        "baseline, and applies at 512² only")


def gpu_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """ResNet-50 and UNet at 512², T=3: pipeline-fed steps vs steps on resident tensors (the ceiling)."""
    from thalia_ray.bench import gpu

    name = gpu.require_gpu()  # also checked by the precheck; the device name goes into the notes
    with tempfile.TemporaryDirectory() as tmp:
        root = _synthesize(tmp, p)
        epoch = iter(range(10**6))
        for model, task in gpu.MODELS:
            setup = gpu.gpu_setup(model, task, p["crop"], p["length"], p["batch_size"], p["steps"], p["warmup"])
            reps = interleave({"ceiling": lambda: gpu.ceiling_rep(setup),
                               "fed": lambda: gpu.fed_rep(setup, root, next(epoch))}, repeats, warmup=0)
            fed = result.add(f"{model} fed by the pipeline", "samples/s", reps["fed"])
            ceiling = result.add(f"{model} resident tensors (ceiling)", "samples/s", reps["ceiling"])
            r = ratio(f"{model}: pipeline-fed / ceiling", fed, ceiling, gpu.KEEPS_UP,
                      "the input pipeline is the bottleneck: add CPUs for Ray Data or shards")
            result.ratios.append(r)
            step = {s: s_.extra_stats("step_ms") for s, s_ in (("fed", fed), ("ceiling", ceiling))}
            result.notes.append(f"{model}: step {step['fed'].median:.1f} ms fed, {step['ceiling'].median:.1f} ms "
                                f"ceiling; the pipeline {'keeps up' if r.met else 'does NOT keep up'}")
    result.notes.append(f"{name}, batch {p['batch_size']}, {p['crop']}², T={p['length']}, fp32")


def predict_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """`thalia-ray predict` over whole frames (T = 1 and 3) vs the model's forward rate on resident windows."""
    from thalia_ray.bench import predict as pr
    from thalia_ray.predict.inputs import frame_ids
    from thalia_ray.predict.plan import plan_units
    from thalia_ray.predict.windows import tile
    from thalia_ray.runtime import usable_cpus

    cores = usable_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        root = _synthesize(tmp, p)
        frames = frame_ids(root)
        for length in (1, 3):
            setup = pr.PredictSetup(root, length, p["crop"], p["model"], p["batch_size"], p["actors"], p["actor_cpus"])
            cfg = setup.config(f"{tmp}/store")
            store, run_id = pr.untrained_run(f"{tmp}/store", cfg)
            units = len(plan_units(root, "annotated", length, frames))
            windows = len(tile((p["size"], p["size"]), p["crop"], setup.overlap))
            reps = interleave({"job": lambda: pr.predict_rep(store, run_id, setup, frames, cores),
                               "ceiling": lambda: pr.ceiling_rep(setup, cfg, units, windows, cores)}, repeats)
            job = result.add(f"predict job, T={length}, incl. start-up", "frames/s/core", reps["job"])
            steady = result.add(f"predict job, T={length}, steady (after the first unit)", "frames/s/core",
                                _extra(reps["job"], "steady"))
            ceiling = result.add(f"model forward only, T={length} (ceiling)", "frames/s/core", reps["ceiling"])
            result.ratios += [
                ratio(f"T={length}: predict / model forward, steady", steady, ceiling, 0.8,
                      "reads, normalisation or blending cost more than the model"),
                ratio(f"T={length}: predict / model forward, incl. start-up", job, ceiling, None,
                      "the job's fixed start-up (model actors, Ray Data execution) weighs less as the job grows"),
            ]
            part = pr.predict_rep(store, run_id, setup, frames[:1], cores)
            peak = job.extra_stats("peak_rss_mib")
            result.notes.append(f"T={length}: {units} units over {len(frames)} frames, {windows} windows each; driver peak "
                                f"RSS {part.extra['peak_rss_mib']:.0f} MiB for {part.extra['units']:.0f} units, "
                                f"{peak.median if peak else float('nan'):.0f} MiB for {units}")
    result.notes.append(f"{p['model']} segmenter, frames {p['size']}², crop {p['crop']}², batch {p['batch_size']}, "
                        f"{p['actors']} actors × {p['actor_cpus']} CPU, {cores} cores; steady rates leave out the start-up and "
                        "the first unit")


def pretrain_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Label efficiency (bench/pretrain.py): a classifier fine-tuned on 5/20/100 % of the labelled training
    series from random initialisation, ImageNet (where cached) and each pretraining run; test AUROC/AP
    over seeds. The seeds are the repetitions (`--repeats` is not used)."""
    from thalia_ray.bench import pretrain as pt

    with tempfile.TemporaryDirectory() as tmp:
        root = p["data"] or _synthesize(tmp, p)
        setup = pt.StudySetup(
            data_root=root, store=p["store"] or f"{tmp}/store", fractions=_floats(p["fractions"]),
            seeds=[int(s) for s in _floats(p["seeds"])], cnn=p["cnn"], vit=p["vit"], methods=p["methods"].split(","),
            crop=p["crop"], batch_size=p["batch_size"], epochs=p["epochs"], max_steps=p["max_steps"],
            pretrain_epochs=p["pretrain_epochs"], pretrain_batch_size=p["pretrain_batch_size"],
            pretrain_max_steps=p["pretrain_max_steps"], lr=p["lr"], concurrent=p["concurrent"],
            workers=p["workers"], cpus_per_worker=p["cpus_per_worker"])
        pt.label_efficiency(setup, result)
    result.notes.append(f"{p['frames']} frames of {p['size']}², crop {p['crop']}², phase input; fine-tuning: "
                        f"{p['epochs']} epochs of ≤ {p['max_steps']} steps, batch {p['batch_size']}, lr {p['lr']} "
                        f"for every arm; pretraining: {p['pretrain_epochs']} epochs of ≤ {p['pretrain_max_steps']} "
                        f"steps, batch {p['pretrain_batch_size']}")


def pretrain_throughput_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Pretraining's stream vs supervised training's on the same cubes (samples/s into a consumer), and
    both end to end (bench/pretrain.py)."""
    from thalia_ray.bench import pretrain as pt
    from thalia_ray.pretrain.run import check, pretrain
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.trainer import fit

    with tempfile.TemporaryDirectory() as tmp:
        root = p["data"] or _synthesize(tmp, p)
        supervised, pretraining = pt.stream_configs(root, p)
        objective = check(pretraining)
        data, pre_run, _ = _ray_runs(pretraining, p["epochs"], source=objective.source)
        labelled, sup_run, _ = _ray_runs(supervised, p["epochs"])
        reps = interleave({"pretrain": pre_run, "supervised": sup_run}, repeats)
        store = ExperimentStore(f"{tmp}/store")

        def later_epochs(history: list[dict[str, Any]], started: float) -> Rep:
            rates = [float(row["time/samples_per_s"]) for row in history[1:]]
            return Rep(harness.spread(rates).median, time.perf_counter() - started, {"epochs": len(rates)})

        def fit_pretraining() -> Rep:
            started = time.perf_counter()
            return later_epochs(pretrain(pretraining, store=store, objective=objective).history, started)

        def fit_supervised() -> Rep:
            started = time.perf_counter()
            return later_epochs(fit(supervised, store=store).history, started)

        e2e = interleave({"pretrain": fit_pretraining, "supervised": fit_supervised}, p["e2e_repeats"], warmup=0)
    pre = result.add("pretraining stream, steady", "samples/s", _extra(reps["pretrain"], "steady"))
    sup = result.add("supervised stream, steady", "samples/s", _extra(reps["supervised"], "steady"))
    pre_all = result.add("pretraining stream, incl. start-up", "samples/s", reps["pretrain"])
    sup_all = result.add("supervised stream, incl. start-up", "samples/s", reps["supervised"])
    pre_e2e = result.add(f"thalia-ray pretrain ({p['method']}), epochs 2+", "samples/s", e2e["pretrain"])
    sup_e2e = result.add("thalia-ray train, epochs 2+", "samples/s", e2e["supervised"])
    result.ratios += [
        ratio("pretraining vs supervised stream, steady", pre, sup, 1.0,
              "pretraining's records cost more per sample than the labelled ones"),
        ratio("pretraining vs supervised stream, incl. start-up", pre_all, sup_all),
        ratio(f"pretrain ({p['method']}) vs train, end to end", pre_e2e, sup_e2e, None),
    ]
    result.notes.append(f"same cubes, crop {p['crop']}², T={p['length']}, batch {p['batch_size']}: pretraining reads "
                        f"every series of the training period ({data.sizes['train']} per epoch; phase + coherence and "
                        f"DEM as targets), supervised training the balanced labelled draw ({labelled.sizes['train']} per "
                        f"epoch; phase, coherence, DEM and the mask); end to end: {p['model']}, 1 worker with "
                        f"{p['cpus_per_worker']} CPU, median over the epochs after the first; the {p['method']} model "
                        "runs the backbone on two views of each sample")


def _floats(text: Any) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]
def learnability_suite(p: Params, repeats: int, result: BenchResult) -> None:
    """Test AUROC after each number of training steps on freshly synthesised data, one repetition per
    model seed (see `bench.learnability`): the evidence that the synthetic data can be learnt."""
    from thalia_ray.bench import learnability as lb

    checkpoints = sorted({int(s) for s in str(p["steps"]).split(",")})
    with tempfile.TemporaryDirectory() as tmp:
        root = _synthesize(tmp, p)
        runs = [lb.curve(lb.run_config(root, p, seed), checkpoints) for seed in range(repeats)]
    for i, steps in enumerate(checkpoints):
        result.add(f"test AUROC after {steps} steps", "AUROC",
                   [Rep(points[i].test_auroc, points[i].seconds, {"val_auroc": points[i].val_auroc})
                    for points, _ in runs])
    medians = [statistics.median(points[i].test_auroc for points, _ in runs) for i in range(len(checkpoints))]
    reached = next((steps for steps, value in zip(checkpoints, medians) if value >= p["target_auroc"]), None)
    result.notes.append(f"median test AUROC reaches {p['target_auroc']} after {reached} steps" if reached is not None
                        else f"median test AUROC stays below {p['target_auroc']} within {checkpoints[-1]} steps")
    counts = runs[0][1]
    seconds = statistics.median(points[-1].seconds for points, _ in runs)
    result.notes.append(f"{p['model']}, crop {p['crop']}², batch {p['batch_size']}, lr {p['lr']}, AdamW, plain PyTorch "
                        f"on the service's samples; {p['frames']} frames of {p['size']}², {counts['train_per_epoch']} "
                        f"samples per balanced training epoch, test {counts['test_positives']} positives / "
                        f"{counts['test_negatives']} negatives, val {counts['val_positives']} / {counts['val_negatives']}; "
                        f"{seconds:.0f} s for {checkpoints[-1]} steps")


def _gpu_precheck() -> None:
    from thalia_ray.bench import gpu

    gpu.require_gpu()


# ------------------------------------------------------------------------------------ registry
_DATA = {"frames": 2, "size": 96, "groups": 12, "length": 1, "crop": 48, "samples": 32}
# data=/shards=: an existing dataset root / shard export instead of synthesising (and exporting) one;
# cpus: the data CPUs of both sides (0: all usable CPUs); balance: the balanced training draw;
# block: Ray Data's samples per block (0: the config's default); epochs: consecutive epochs per repetition
_INGEST = {"source": "cube", "data": "", "shards": "", "cpus": 0, "balance": False, "block": 0, "epochs": 5}
# small: the demo's data and classifier (demo.DEMO_OVERRIDES) at batch 16; steps: the curve's checkpoints
_LEARN = {"seed": 0, "length": 1, "crop": 48, "model": "resnet18", "lr": 1e-3, "batch_size": 16,
          "steps": "0,25,50,100,200,400", "target_auroc": 0.8}
SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("cube", "minicube windowed reads vs per-sample cube open + whole-frame reads", cube_suite,
          {"small": _DATA, "medium": {**_DATA, "size": 256, "frames": 3, "crop": 64},
           "large": {**_DATA, "size": 512, "frames": 4, "crop": 64, "length": 3, "samples": 64}}, needs_ray=False),
    Suite("shards", "own WebDataset shards vs published .pth members (torch.load), worker memory 1× vs 4×",
          shards_suite, {"small": _DATA, "medium": {**_DATA, "crop": 96, "size": 128, "samples": 48},
                         "large": {**_DATA, "size": 512, "frames": 4, "crop": 256, "length": 3, "samples": 64}}),
    Suite("pipeline", "Ray Data pipeline vs a DataLoader with persistent workers, same plan and per-sample work",
          pipeline_suite, {"small": {**_DATA, "batch_size": 8, **_INGEST},
                           "medium": {**_DATA, "size": 256, "frames": 3, "groups": 24, "batch_size": 16, **_INGEST},
                           "large": {**_DATA, "size": 256, "frames": 16, "groups": 150, "crop": 128, "length": 3,
                                     "batch_size": 16, **_INGEST}}, repeats=3),
    Suite("cluster", "Ray Data pipeline on a 1-node vs a multi-node ray.cluster_utils.Cluster",
          cluster_suite, {"small": {**_DATA, "batch_size": 8, **_INGEST, "nodes": 2, "node_cpus": 1},
                          "medium": {**_DATA, "size": 256, "frames": 3, "groups": 24, "batch_size": 16, **_INGEST,
                                     "nodes": 2, "node_cpus": 1}}, repeats=3, needs_ray=False),
    Suite("e2e", "thalia-ray train samples/s vs a plain PyTorch script (same model, batch, optimiser, threads)",
          e2e_suite, {size: {"frames": 4, "size": 256, "groups": groups, "seed": 5, "data": "", "length": 3,
                             "crop": 96, "model": "mobilenetv3_small", "batch_size": 16, "epochs": epochs,
                             "cpus_per_worker": 1.0, "data_cpus": 0, "loader_workers": 0}
                      for size, groups, epochs in (("small", 20, 3), ("medium", 150, 4), ("large", 150, 8))},
          repeats=1),
    Suite("remote", "thalia-ray train from a bucket at a distance (rclone + latency proxy) vs local disk and "
          "a DataLoader script on the same bucket", remote_suite,
          {size: {"frames": 4, "size": 256, "groups": groups, "seed": 5, "data": "", "length": 3, "crop": 96,
                  "model": "mobilenetv3_small", "batch_size": 16, "epochs": 3, "cpus_per_worker": 1.0,
                  "loader_workers": 0, "latency_ms": 50.0, "bandwidth_mbs": 0.0, "cache": True, "local": True,
                  "baseline": True, "shards": "", "balance": True} for size, groups in (("small", 20), ("medium", 150))},
          repeats=1, needs_ray=False),
    Suite("train_step", "Ray Train step throughput vs a bare PyTorch loop (same model, same batches)",
          train_step_suite, {
              "small": {"model": "mobilenetv3_small", "task": "classification", "crop": 48, "length": 1,
                        "batch_size": 8, "steps": 63, "warmup": 3, "threads": 0},
              "medium": {"model": "resnet18", "task": "classification", "crop": 64, "length": 1,
                         "batch_size": 8, "steps": 63, "warmup": 3, "threads": 0},
              "large": {"model": "unet", "task": "segmentation", "crop": 128, "length": 3,
                        "batch_size": 8, "steps": 43, "warmup": 3, "threads": 0}}, repeats=5),
    Suite("sweep", "ASHA vs full grid: worker-seconds to within 1 % of the grid's best val F1", sweep_suite,
          {"small": {**_DATA, "groups": 16, "crop": 32, "backbones": "resnet18,mobilenetv3_small", "lrs": "1e-3,3e-4",
                     "epochs": 3, "batch_size": 8, "max_steps": 4},
           "medium": {**_DATA, "groups": 24, "crop": 48, "backbones": "resnet18,mobilenetv3_small,convnext_atto",
                      "lrs": "1e-3,3e-4", "epochs": 4, "batch_size": 8, "max_steps": 8},
           "large": {**_DATA, "size": 128, "groups": 24, "crop": 64, "epochs": 6, "batch_size": 16, "max_steps": 16,
                     "backbones": "resnet18,mobilenetv3_small,convnext_atto,efficientnetv2_tiny", "lrs": "1e-3,3e-4,1e-4"}},
          repeats=1),
    Suite("synthetic", "synthetic generator series/s per core vs the 10 series/s target",
          synthetic_suite, {"small": {"gen_size": 256, "length": 3, "series": 4, "target_per_s": 10},
                            "medium": {"gen_size": 512, "length": 3, "series": 10, "target_per_s": 10},
                            "large": {"gen_size": 512, "length": 3, "series": 20, "target_per_s": 10}}, needs_ray=False),
    Suite("predict", "whole-frame predict frames/s per core (512², T=1 and 3) vs the model's forward rate",
          predict_suite, {s: {"frames": f, "size": 512, "groups": g, "crop": 128, "model": "unet",
                              "batch_size": 8, "actors": 2, "actor_cpus": 0.5}
                          for s, f, g in (("small", 1, 2), ("medium", 2, 4), ("large", 4, 8))}, repeats=2),
    Suite("reference", "test metrics of a paper preset (reference forms) vs each service default, paired by seed",
          reference_suite, {s: {"frames": f, "size": 96, "groups": g, "data_seed": 0, "crop": 64, "model": "resnet18",
                                "epochs": e, "lr": 3e-4} for s, f, g, e in (("small", 4, 16, 3), ("medium", 6, 24, 6),
                                                                         ("large", 8, 48, 10))}, repeats=3),
    Suite("pretrain", "label efficiency: fine-tuning on 5/20/100 % of labels from random init, ImageNet (cached) "
          "and each pretraining method; test AUROC/AP over seeds", pretrain_suite,
          {size: {"frames": frames, "size": side, "groups": groups, "length": 1, "data": "", "store": "",
                  "fractions": "0.05,0.2,1.0", "seeds": "0,1,2", "cnn": cnn, "vit": vit, "methods": "simclr,byol,mae",
                  "crop": crop, "batch_size": batch, "epochs": epochs, "max_steps": steps, "lr": lr,
                  "pretrain_epochs": p_epochs, "pretrain_batch_size": 2 * batch, "pretrain_max_steps": p_steps,
                  "concurrent": concurrent, "workers": 1, "cpus_per_worker": cpus}
           for size, frames, side, groups, cnn, vit, crop, batch, epochs, steps, lr, p_epochs, p_steps, concurrent, cpus in (
               ("small", 4, 96, 40, "resnet18", "vit_tiny", 64, 4, 3, 6, 3e-4, 3, 8, 2, 0.5),
               ("medium", 8, 256, 80, "resnet18", "vit_tiny", 128, 8, 8, 20, 3e-4, 10, 40, 2, 1.0),
               ("large", 38, 512, 300, "resnet50", "vit_small", 224, 32, 30, 200, 1e-4, 100, 400, 8, 8.0))},
          repeats=1),
    Suite("pretrain_throughput", "pretraining vs supervised training on the same cubes: stream samples/s and end to end",
          pretrain_throughput_suite,
          {size: {"frames": frames, "size": side, "groups": groups, "length": 1, "data": "", "crop": crop,
                  "batch_size": 8, "epochs": 3, "model": "resnet18", "method": "simclr", "cpus_per_worker": 1.0,
                  "e2e_repeats": 1}
           for size, frames, side, groups, crop in (("small", 3, 96, 24, 48), ("medium", 4, 256, 60, 96),
                                                     ("large", 8, 512, 150, 128))}, repeats=3),
    Suite("learnability", "test AUROC after N training steps on synthetic data (is it learnable?)",
          learnability_suite, {
              "small": {**_LEARN, "frames": 4, "size": 96, "groups": 40},
              "medium": {**_LEARN, "frames": 8, "size": 128, "groups": 60, "steps": "0,50,100,200,400,800"},
              "large": {**_LEARN, "frames": 16, "size": 256, "groups": 60, "crop": 64,
                        "steps": "0,100,200,400,800,1600"}}, repeats=3, needs_ray=False),
    Suite("gpu", "GPU samples/s and step time (ResNet-50, UNet at 512², T=3) vs the resident-tensor ceiling",
          gpu_suite, {s: {"frames": f, "size": 512, "groups": 24, "crop": 512, "length": 3, "batch_size": b,
                          "steps": 25, "warmup": 5} for s, f, b in (("small", 2, 8), ("medium", 4, 16), ("large", 8, 32))},
          repeats=3, precheck=_gpu_precheck),
)}


def _parse(value: Any, like: Any) -> Any:
    """An override given as text, converted to the preset value's type."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    if isinstance(like, bool):
        return value.lower() in ("1", "true", "yes")
    return type(like)(value)


def resolve_params(suite: Suite, options: BenchOptions) -> Params:
    if options.size not in suite.presets:
        raise ValueError(f"bench {suite.name}: unknown size {options.size!r}; choose from {', '.join(suite.presets)}")
    params = dict(suite.presets[options.size])
    unknown = sorted(set(options.params) - set(params))
    if unknown:
        raise ValueError(f"bench {suite.name}: unknown parameter(s) {', '.join(unknown)}; "
                         f"this suite takes {', '.join(sorted(params))}")
    try:
        params.update({k: _parse(v, params[k]) for k, v in options.params.items()})
    except ValueError as err:
        raise ValueError(f"bench {suite.name}: bad parameter value ({err})") from None
    return params


def run_suite(name: str, options: BenchOptions | None = None) -> BenchResult:
    """Run suite `name` with `options`; connects to or starts Ray when the suite needs it.

    Raises KeyError for an unknown suite and `SuiteUnavailable` when the machine cannot run it.
    """
    from thalia_ray.runtime import describe_machine

    if name not in SUITES:
        raise KeyError(f"no benchmark suite {name!r}; available: {', '.join(SUITES)}")
    suite, options = SUITES[name], options or BenchOptions()
    params = resolve_params(suite, options)
    if suite.precheck is not None:
        suite.precheck()
    repeats = options.repeats or suite.repeats
    result = BenchResult(name, {"size": options.size, "repeats": repeats, **params}, machine=describe_machine())
    started = time.perf_counter()
    if suite.needs_ray:
        from thalia_ray import runtime
        from thalia_ray.config import RuntimeConfig

        with runtime.start(RuntimeConfig(log_level="WARNING")):
            suite.run(params, repeats, result)
    else:
        suite.run(params, repeats, result)
    result.seconds = time.perf_counter() - started
    return result


__all__ = ["BenchOptions", "SUITES", "Suite", "SuiteUnavailable", "resolve_params", "run_suite"]
