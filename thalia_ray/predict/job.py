"""`thalia-ray predict`: a trained run over whole frames as a Ray Data batch-inference job.

Read tasks open each unit's cube (local or S3), read the whole frame once, normalise it with the
run's statistics and cut it into overlapping crop-sized windows; a pool of model actors (CPU, or
`train.gpus_per_worker` GPUs each when the cluster has GPUs) runs them in batches; the driver blends
each unit's windows as they stream in and writes the unit as soon as its last window arrives, so
memory holds only the units in flight, not the archive. Units with a completion record are skipped,
so a rerun finishes what an interrupted one left; a unit that cannot be read is reported by name
and the others are still written.
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from thalia_ray import interrupts
from thalia_ray.config import ThaliaConfig
from thalia_ray.predict import inputs, output
from thalia_ray.predict.frame_metrics import DEFAULT_THRESHOLD, whole_frame_metrics
from thalia_ray.predict.plan import Unit, plan_units
from thalia_ray.predict.windows import Stitcher, blend_weights, tile
from thalia_ray.storage import Location, local
from thalia_ray.store.layout import ExperimentStore


@dataclass(frozen=True)
class PredictOptions:
    data: str | Location  # a Location resolved with the storage settings, or a local path
    out: str | Location  # likewise
    pairs: str = "annotated"
    frames: Sequence[str] | None = None
    overlap: float = 0.25
    batch_size: int | None = None  # default: the run's train.batch_size
    actors: int = 1
    threshold: float = DEFAULT_THRESHOLD
    progress: bool | None = None  # None: when stderr is a terminal


@dataclass
class PredictReport:
    run_id: str
    out: str
    planned: int
    skipped: int
    written: int
    failed: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    seconds: float = 0.0
    first_unit_s: float | None = None  # seconds to the first finished unit: the start-up a rate should leave out

    def summary(self) -> str:
        lines = [f"predict {self.run_id} → {self.out}: {self.planned} units, {self.skipped} already complete, "
                 f"{self.written} written, {len(self.failed)} failed ({self.seconds:.1f} s)"]
        lines += [f"  FAILED {key}: {reason}" for key, reason in sorted(self.failed.items())]
        if self.evaluation:
            m = self.evaluation["overall"]
            ap = "-" if m["ap"] is None else f"{m['ap']:.4f}"
            lines.append(f"whole-frame: n={m['n']} AP={ap} F1={m['f1']:.4f} at threshold {self.evaluation['threshold']}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ReadSpec:
    """What a read task needs, small enough to ship with every task."""

    root: Location
    channels: tuple[str, ...]
    statistics: dict[str, dict[str, float]] | None
    crop: int
    overlap: float
    length: int


def read_windows(row: dict[str, Any], spec: ReadSpec) -> list[dict[str, Any]]:
    """A unit's normalised (T·C, crop, crop) windows; one row with `error` set when it cannot be read."""
    depth = spec.length * len(spec.channels)
    try:
        cube = inputs.open_cube(spec.root, row["frame_id"])
        stack = inputs.read_stack(cube, row["primary_date"], list(row["secondary_dates"]), spec.channels)
        if spec.statistics is not None:
            stack = inputs.normalize(stack, spec.channels, spec.statistics)
    except Exception as err:  # noqa: BLE001 - any failure to read a unit is reported with the unit
        blank = np.zeros((depth, spec.crop, spec.crop), dtype=np.float32)
        return [{"key": row["key"], "row": 0, "col": 0, "height": 0, "width": 0, "image": blank,
                 "error": f"{type(err).__name__}: {err}"}]
    image = stack.reshape(depth, *stack.shape[-2:])
    rows = []
    for w in tile(image.shape[-2:], spec.crop, spec.overlap):
        patch = np.zeros((depth, spec.crop, spec.crop), dtype=np.float32)  # 0 = the channel mean after normalising
        patch[:, :w.height, :w.width] = image[:, w.row:w.row + w.height, w.col:w.col + w.width]
        rows.append({"key": row["key"], "row": w.row, "col": w.col, "height": w.height, "width": w.width,
                     "image": patch, "error": ""})
    return rows


class Predictor:
    """A model actor: the run's best checkpoint, Deformation probability per pixel of each window
    (segmenters) or per window, broadcast over it (classifiers)."""

    def __init__(self, raw_cfg: dict[str, Any], checkpoint: Any) -> None:
        import ray
        import torch

        cfg = ThaliaConfig.model_validate(raw_cfg)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, round(cpus)))  # the actor's share, not every core of the node
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = inputs.load_model(cfg, checkpoint).to(self.device).eval()
        self.task, self.precision = cfg.model.task, cfg.train.precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        images = torch.from_numpy(np.require(batch["image"], np.float32, ["C", "W"])).to(self.device)
        with torch.inference_mode(), inputs.autocast(self.device, self.precision):
            logits = self.model(images)["logits"].float()
        probability = logits.softmax(dim=1)[:, 1]
        if self.task == "classification":
            probability = probability[:, None, None].expand(-1, *images.shape[-2:])
        kept = {k: batch[k] for k in ("key", "row", "col", "height", "width", "error")}
        return {**kept, "probability": probability.cpu().numpy().astype(np.float16)}


def _window_batches(cfg: ThaliaConfig, checkpoint: Any, todo: Sequence[Unit], spec: ReadSpec,
                    options: PredictOptions) -> Iterator[dict[str, np.ndarray]]:
    import ray

    use_gpu = inputs.gpu_wanted(cfg)
    dataset = ray.data.from_items([u.row() for u in todo], override_num_blocks=max(1, len(todo)))
    # Readers ask for a quarter CPU: beside actors holding most of a small node's CPUs, Ray Data's per-operator
    # reservation must still fit one read task, or the job waits for resources that never come.
    dataset = dataset.flat_map(functools.partial(read_windows, spec=spec), num_cpus=0.25)
    dataset = dataset.map_batches(
        Predictor, fn_constructor_args=(cfg.model_dump(mode="json"), checkpoint), batch_format="numpy",
        batch_size=options.batch_size or cfg.train.batch_size, compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=cfg.train.cpus_per_worker, num_gpus=cfg.train.gpus_per_worker if use_gpu else 0,
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


class _Progress:
    """A bar on a terminal; silent elsewhere (job logs)."""

    def __init__(self, total: int, enabled: bool | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="unit", desc="predict", disable=not (sys.stderr.isatty() if enabled is None
                                                                               else enabled))
        self.started = time.perf_counter()
        self.first_unit_s: float | None = None  # the job's start-up plus its first unit

    def update(self, failed: int) -> None:
        if self.first_unit_s is None:
            self.first_unit_s = time.perf_counter() - self.started
        self.bar.set_postfix(failed=failed)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class PredictPlan:
    """Everything decided before Ray starts: the run, the units, what is left to do."""

    run_id: str
    cfg: ThaliaConfig
    checkpoint: Any
    out: Location
    units: list[Unit]
    todo: list[Unit]
    spec: ReadSpec


def prepare(store: ExperimentStore, run_id: str, options: PredictOptions) -> PredictPlan:
    """Resolve the run, plan the units and find the complete ones; errors name the run, frame or option."""
    cfg = store.existing_run(run_id).read_config()
    out, root = local(options.out), local(options.data)
    # The data and the pairs first (the likelier mistake), then the run's checkpoint.
    units = plan_units(root, options.pairs, cfg.data.length, options.frames, cfg.seed, cfg.data.label_rule)
    _, checkpoint, _ = inputs.run_checkpoint(store, run_id)
    done = output.completed(out, sorted({u.frame_id for u in units}))
    spec = ReadSpec(root, tuple(cfg.data.channels), inputs.run_statistics(cfg), cfg.data.crop,
                    options.overlap, cfg.data.length)
    return PredictPlan(run_id, cfg, checkpoint, out, units, [u for u in units if u.key not in done], spec)


def execute(store: ExperimentStore, plan: PredictPlan, options: PredictOptions) -> PredictReport:
    """Run the plan's remaining units (needs Ray), then write the table and the evaluation.

    Ctrl-C or SIGTERM (`interrupts`): the units written so far are kept (each has its completion record),
    windows of units in flight are dropped, and Interrupted says how to finish."""
    started = time.perf_counter()
    out, units = plan.out, plan.units
    progress = _Progress(len(plan.todo), options.progress)
    stop = interrupts.current()
    with stop.graceful(f"predict {plan.run_id}"):
        failed, written = _run(plan, options, progress, stop) if plan.todo else ({}, 0)
    progress.close()
    output.write_failures(out, failed)
    if stop.requested:
        raise interrupts.interrupted(
            f"predict {plan.run_id} → {out.url} interrupted by {stop.requested_signal()}: {written} of {len(plan.todo)} "
            "units written (kept); rerun the same command to finish the others", stop)
    planned = {u.key for u in units}
    rows = [r for key, r in output.completed(out, sorted({u.frame_id for u in units})).items() if key in planned]
    if rows:
        output.write_table(out, rows)
    evaluation = whole_frame_metrics(rows, options.threshold)
    if evaluation is not None:
        evaluation = {"out": out.url, "pairs": options.pairs, **evaluation}
        out.join(output.EVALUATION).write_json(evaluation)
        store.run(plan.run_id).write_whole_frame(evaluation)
    return PredictReport(plan.run_id, out.url, len(units), len(units) - len(plan.todo), len(plan.todo) - len(failed),
                         failed, evaluation, time.perf_counter() - started, progress.first_unit_s)


def predict(store: ExperimentStore, run_id: str, options: PredictOptions) -> PredictReport:
    """`prepare` then `execute`: run `run_id`'s best checkpoint over the units of `options`."""
    return execute(store, prepare(store, run_id, options), options)


def _run(plan: PredictPlan, options: PredictOptions, progress: _Progress,
         stop: interrupts.Stop) -> tuple[dict[str, str], int]:
    """Stream the windows of the remaining units through the model; write each unit when complete, until
    done or asked to stop. Returns the failures, by unit key, and how many units were written."""
    cfg, units, todo, spec, out = plan.cfg, plan.units, plan.todo, plan.spec, plan.out
    by_key = {u.key: u for u in todo}
    cubes = {f: inputs.open_cube(spec.root, f) for f in sorted({u.frame_id for u in todo})}
    frames: dict[str, output.FrameOutput] = {}
    weights = blend_weights(spec.crop, spec.overlap)
    expected = {f: len(tile(c.shape, spec.crop, spec.overlap)) for f, c in cubes.items()}
    stitchers: dict[str, Stitcher] = {}
    failed: dict[str, str] = {}
    written = 0
    signal_at = stop.signal_at
    for batch in _window_batches(cfg, plan.checkpoint, todo, spec, options):
        if stop.requested:
            break
        for i, key in enumerate(batch["key"]):
            unit = by_key[str(key)]
            if batch["error"][i]:
                failed[unit.key] = str(batch["error"][i])
                progress.update(len(failed))
                continue
            cube = cubes[unit.frame_id]
            stitcher = stitchers.setdefault(unit.key, Stitcher(cube.shape, expected[unit.frame_id], weights))
            window = inputs.Window(*(int(batch[k][i]) for k in ("row", "col", "height", "width")))
            stitcher.add(window, batch["probability"][i].astype(np.float32))
            if stitcher.complete:
                probability = stitchers.pop(unit.key).result().astype(np.float16)  # as stored: the table agrees
                if unit.frame_id not in frames:
                    frames[unit.frame_id] = output.FrameOutput(
                        out, cube, [u for u in units if u.frame_id == unit.frame_id], spec.length)
                frames[unit.frame_id].write(unit, probability)
                output.mark_done(out, unit, output.summary_row(unit, probability, options.threshold))
                progress.update(len(failed))
                written += 1
                if signal_at is not None:
                    signal_at.fire("after-unit", written, stop)
    return failed, written
