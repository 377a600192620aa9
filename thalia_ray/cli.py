"""The `thalia-ray` command. Thin: it parses arguments and delegates to the modules that do the work.

Handlers import their modules lazily so that `thalia-ray config show` answers without importing torch.
Every mistake a user can fix is a `ThaliaError`, printed as one line with the exit status of its kind
(see `thalia_ray.errors`); commands that start Ray run `thalia_ray.preflight` first, so such mistakes
are reported before any cluster work. `--debug` or THALIA_DEBUG=1 shows the traceback as well.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from thalia_ray import interrupts
from thalia_ray.config import ConfigError, ThaliaConfig, load_config
from thalia_ray.errors import StorageProblem, ThaliaError

if TYPE_CHECKING:  # imported lazily by the handlers (see above)
    from thalia_ray.store import ExperimentStore

Handler = Callable[[argparse.Namespace], int]
DEBUG_ENV = "THALIA_DEBUG"


def _config(args: argparse.Namespace) -> ThaliaConfig:
    return load_config(getattr(args, "config", None), getattr(args, "set", None) or ())


def _with_option(cfg: ThaliaConfig, path: str, option: str, value: object) -> ThaliaConfig:
    """`cfg` with a command-line option's value at its dotted `path`, validated there; a value the
    configuration refuses is reported in one line under the option the user typed."""
    try:
        return cfg.with_overrides({path: value})
    except ConfigError as err:
        raise ConfigError(f"{option} {value}: " + " ".join(str(err).split())) from None


def _add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("config", nargs=None if required else "?", help="run configuration (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")


# ----------------------------------------------------------------------------------- handlers
def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2) if args.json else cfg.to_yaml(), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from thalia_ray.models.registry import REGISTRY, smp_encoders, timm_classifiers

    for name, spec in REGISTRY.items():
        print(f"{name:22s} {spec.family:16s} {'/'.join(spec.tasks):28s} {spec.arch}")
    if args.all:
        print("\nclassification, model.name = any timm model (installed timm):")
        print("\n".join(timm_classifiers()))
        print("\nsegmentation, model.encoder = any smp encoder, or tu-<timm model> (installed smp):")
        print("\n".join(smp_encoders()))
    return 0


def _emit_json(args: argparse.Namespace, value: object) -> None:
    """A command's `--json` summary: the one JSON document on stdout (see `main`)."""
    from dataclasses import asdict, is_dataclass

    stream = getattr(args, "summary_out", sys.stdout)
    print(json.dumps(asdict(value) if is_dataclass(value) else value, indent=2, default=str), file=stream)


def cmd_synth(args: argparse.Namespace) -> int:
    from thalia_ray import progress
    from thalia_ray.data.synthetic.generator import synthesize
    from thalia_ray.storage import writing_to

    frames = progress.bar(args.frames if not args.frame_ids else len(args.frame_ids), "synth", unit="frame")
    with writing_to(args.out):
        report = synthesize(
            args.out,
            frames=args.frames,
            size=args.size,
            seed=args.seed,
            meta_dir=args.from_annotations,
            frame_ids=args.frame_ids,
            max_groups_per_frame=args.max_groups,
            workers=args.workers,
            progress=lambda line: frames.update(1) if progress.on_terminal() else print(line, file=sys.stderr),
        )
    frames.close()
    if args.json:
        _emit_json(args, report)
        return 0
    print(f"wrote {report.frames} frames, {report.pairs} interferograms, {report.groups} series to {args.out} "
          f"in {report.seconds:.1f} s")
    return 0


def cmd_prepare_index(args: argparse.Namespace) -> int:
    from thalia_ray.data.annotations import describe_left_out
    from thalia_ray.data.index import index_at
    from thalia_ray.preflight import location_present
    from thalia_ray.storage import resolve

    cfg = _with_option(_config(args), "data.length", "--length", args.length)
    location_present(args.data, "--data", cfg.storage)
    index = index_at(resolve(args.data, cfg.storage), cfg.data.length, args.policy)
    counts = index.counts()
    if args.json:  # the split rows, and each annotation or series member left out of them
        print(json.dumps({**counts, "left_out": [item.row() for item in index.left_out]}, indent=2))
        return 0
    print(f"T={args.length} policy={args.policy} data={args.data}")
    print(f"{'split':8s} {'samples':>9s} {'positives':>10s} {'negatives':>10s}")
    for split, row in counts.items():
        print(f"{split:8s} {row['samples']:9d} {row['positives']:10d} {row['negatives']:10d}")
    if index.left_out:
        print(f"{describe_left_out(index.left_out)} (--json lists each)")
    return 0


def cmd_prepare_stats(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray import preflight, runtime
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.stats import compute_statistics
    from thalia_ray.storage import resolve

    if args.data:
        cfg = cfg.with_overrides({"data.root": args.data})
    preflight.for_stats(cfg, args.split)
    out = resolve(args.out, cfg.storage) if args.out else None
    with runtime.start(cfg.runtime):
        stats = compute_statistics(cfg.data, split=args.split, out=out, locations=DataLocations.of(cfg.data, cfg.storage))
    _emit_json(args, stats)  # the statistics are JSON either way; --json is accepted for uniformity
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray import preflight, runtime
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.shards.export import export_shards
    from thalia_ray.storage import resolve

    cfg = cfg.with_overrides({"data.root": args.data}) if args.data else cfg
    if args.length is not None:
        cfg = _with_option(cfg, "data.length", "--length", args.length)
    preflight.for_export(cfg, args.out, args.split, args.samples_per_shard, args.all_channels)
    with runtime.start(cfg.runtime):
        report = export_shards(cfg.data, resolve(args.out, cfg.storage), cfg.data.length, splits=tuple(args.split),
                               samples_per_shard=args.samples_per_shard, dtype=args.dtype, compress=args.compress,
                               all_channels=args.all_channels, seed=cfg.seed,
                               locations=DataLocations.of(cfg.data, cfg.storage))
    if args.json:
        _emit_json(args, report)
        return 0
    print(f"{report.shards_written} shards written, {report.shards_kept} kept, {sum(report.samples.values())} "
          f"samples {report.samples}, {report.bytes / 1e6:.1f} MB, {len(report.skipped)} skipped, "
          f"{len(report.left_out)} left out of the index, {report.seconds:.1f} s → {report.root}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray import preflight, runtime
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.trainer import fit

    preflight.for_training(cfg, args.run_id)
    store = ExperimentStore(cfg.storage.store, cfg.storage)
    run_id = args.run_id or store.new_run_id(cfg.name)
    lease = store.run(run_id).acquire()  # a run id another driver is writing is refused before Ray starts
    try:
        with runtime.start(cfg.runtime):
            result = fit(cfg, store=store, lease=lease)
    finally:
        lease.release()
    if args.json:
        _emit_json(args, result)
        return 0
    print(result)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from thalia_ray import preflight, runtime
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.evaluate import evaluate_run

    store = ExperimentStore(args.store)
    cfg = store.run(args.run).read_config()
    preflight.for_evaluation(cfg, args.split)
    preflight.checkpoint_loads(store, args.run)
    with runtime.start(cfg.runtime):
        result = evaluate_run(store, args.run, split=args.split)
    if args.json:
        _emit_json(args, result)
        return 0
    print(result)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from thalia_ray import runtime
    from thalia_ray.predict.evaluate import DEFAULT_THRESHOLD
    from thalia_ray.predict.job import PredictOptions, execute, prepare
    from thalia_ray.store import ExperimentStore

    store = ExperimentStore(args.store)
    cfg = store.existing_run(args.run).read_config()
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    options = PredictOptions(data=args.data, out=args.out, pairs=args.pairs, frames=args.frames, overlap=args.overlap,
                             batch_size=args.batch_size, actors=args.actors, threshold=threshold)
    plan = prepare(store, args.run, options)  # run, frames and pairs are checked before Ray starts
    with runtime.start(cfg.runtime):
        report = execute(store, plan, options)
    print(report.summary())
    return 1 if report.failed else 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from thalia_ray.export.model import export_run
    from thalia_ray.store import ExperimentStore

    result = export_run(ExperimentStore(args.store), args.run, args.format, args.out)
    print(result.summary())
    return 0


def _reconciled_store(location: str, target: str | None = None) -> ExperimentStore:
    """The store, once its `running` runs whose driver is gone are marked interrupted (only `target` when
    that is a run; else all, a sweep's trials among them): commands that show runs never show a dead
    one as running."""
    from thalia_ray.store import ExperimentStore

    store = ExperimentStore(location)
    store.reconcile_runs(target if target and store.run(target).exists() else None)
    return store


def cmd_runs(args: argparse.Namespace) -> int:
    from thalia_ray.store import format_run, format_runs_table

    store = _reconciled_store(args.store, args.run_id)
    if args.run_id:
        print(format_run(store.run(args.run_id)))
    else:
        print(format_runs_table(store.list_runs()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.sweep is None:
        raise ConfigError(f"{args.config}: no sweep section (a sweep file needs `sweep:` with a search space)")
    from thalia_ray import preflight, runtime
    from thalia_ray.store import ExperimentStore
    from thalia_ray.store.leaderboard import leaderboard_text
    from thalia_ray.tune.driver import run_sweep

    preflight.for_sweep(cfg, args.sweep_id)
    with runtime.start(cfg.runtime):
        summary = run_sweep(cfg, resume=args.resume, sweep_id=args.sweep_id)
    if args.json:
        _emit_json(args, summary.to_json())
        return 0 if summary.status == "finished" else 1
    print(leaderboard_text(ExperimentStore(cfg.storage.store, cfg.storage), summary.sweep_id))
    print(f"sweep {summary.sweep_id}: {len(summary.trials)} trials, best {summary.best_run} "
          f"({summary.metric} = {summary.best_value}), {summary.worker_seconds:.0f} worker-seconds")
    return 0 if summary.status == "finished" else 1


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from thalia_ray.store.leaderboard import best_config, leaderboard_text

    store = _reconciled_store(args.store)
    if args.breakdown or args.format in ("csv", "json"):
        from thalia_ray.store import tables

        table = (tables.breakdown_table(store, args.breakdown, args.sweep, args.metric, args.mode) if args.breakdown
                 else tables.runs_table(store, args.sweep, args.metric, args.mode))
        print(tables.as_text(table, args.format))
    else:
        print(leaderboard_text(store, args.sweep, fmt=args.format, metric=args.metric, mode=args.mode))
    if args.best_config:
        from thalia_ray.storage import resolve

        resolve(args.best_config).write_text(best_config(store, args.sweep, args.metric, args.mode).to_yaml())
        print(f"best configuration written to {args.best_config}", file=sys.stderr)  # stdout: the table only
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from thalia_ray.report.page import write_report

    page = write_report(_reconciled_store(args.store, args.target), args.target, args.out)
    print(page.url)
    if args.screenshot:
        from thalia_ray.report.browser import screenshot_beside

        print(screenshot_beside(page).url)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from thalia_ray.jobs import load_spec, plain_ray_command, submit

    spec = load_spec(args.spec, args.set)
    if args.print_ray_command:
        print(plain_ray_command(spec, args.address))
        return 0
    outcome = submit(spec, args.address, follow=args.follow)
    print(outcome.summary())
    return 0 if outcome.succeeded or not args.follow else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from thalia_ray.jobs import format_jobs, job_logs, list_jobs, stop_job

    if args.action == "list":
        print(format_jobs(list_jobs(args.address)))
        return 0
    if not args.job_id:
        raise SystemExit(f"thalia-ray jobs {args.action}: give a submission id")
    if args.action == "stop":
        stopped = stop_job(args.address, args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
        return 0
    print(job_logs(args.address, args.job_id))
    return 0


def cmd_cluster_validate(args: argparse.Namespace) -> int:
    from thalia_ray.manifests import ManifestError, validate_file

    reports = {path: validate_file(path, args.crds) for path in args.files}
    for path, report in reports.items():
        for warning in report.warnings:
            print(f"thalia-ray: warning: {path}: {warning}", file=sys.stderr)
    bad = {path: report.problems for path, report in reports.items() if report.problems}
    if bad:
        raise ManifestError("; ".join(f"{path}: {len(p)} problem(s):\n  " + "\n  ".join(p) for path, p in bad.items()))
    for path in reports:
        print(f"{path}: valid")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from thalia_ray.demo import run_demo

    return run_demo(workdir=args.workdir, overrides=args.set)


def cmd_bench(args: argparse.Namespace) -> int:
    from thalia_ray.bench.harness import SuiteUnavailable, write_record
    from thalia_ray.bench.suites import SUITES, BenchOptions, run_suite

    if args.suite == "list":
        for name, suite in SUITES.items():
            print(f"{name:12s} {suite.summary}")
        return 0
    params = dict(item.partition("=")[::2] for item in args.param)
    try:
        result = run_suite(args.suite, BenchOptions(size=args.size, repeats=args.repeats, params=params))
    except SuiteUnavailable as err:
        print(f"thalia-ray bench {args.suite}: {err}", file=sys.stderr)
        return 3
    except (KeyError, ValueError) as err:
        print(f"thalia-ray bench: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    where = write_record(result, args.store)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    print(f"record: {where.url}", file=sys.stderr)
    return 0


# Commands whose `--json` prints a summary with `_emit_json`.
JSON_SUMMARIES = (cmd_synth, cmd_prepare_stats, cmd_export, cmd_train, cmd_evaluate, cmd_sweep)


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from thalia_ray.store.leaderboard import BREAKDOWNS

    parser = argparse.ArgumentParser(prog="thalia-ray", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    config = verbs.add_parser("config", help="show the resolved configuration").add_subparsers(dest="what", required=True)
    show = config.add_parser("show", help="print the resolved configuration")
    _add_config_args(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=cmd_config_show)

    models = verbs.add_parser("models", help="list the model registry")
    models.add_argument("--all", action="store_true", help="also every timm model and smp encoder installed")
    models.set_defaults(handler=cmd_models)

    synth = verbs.add_parser("synth", help="generate synthetic Thalia minicubes")
    synth.add_argument("--out", required=True, help="dataset root: local path or s3://bucket/prefix")
    synth.add_argument("--frames", type=int, default=4)
    synth.add_argument("--size", type=int, default=128, help="frame side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--from-annotations", metavar="META_DIR", help="real annotations + time-series index")
    synth.add_argument("--frame-ids", nargs="+", metavar="ID")
    synth.add_argument("--max-groups", type=int, default=None, help="time-series groups per frame")
    synth.add_argument("--workers", type=int, default=1)
    synth.add_argument("--json", action="store_true", help="print the summary as JSON")
    synth.set_defaults(handler=cmd_synth)

    prepare = verbs.add_parser("prepare", help="dataset preparation").add_subparsers(dest="what", required=True)
    index = prepare.add_parser("index", help="count samples per split")
    index.add_argument("--data", required=True, help="dataset root or folder with annotations + index")
    index.add_argument("--length", type=int, default=1, help="time-series length T")
    index.add_argument("--policy", choices=["enumerate", "resample"], default="enumerate")
    index.add_argument("--json", action="store_true")
    _add_config_args(index)  # storage settings (storage.endpoint_url) for an s3:// --data
    index.set_defaults(handler=cmd_prepare_index)
    stats = prepare.add_parser("stats", help="recompute statistics.json (a Ray job)")
    _add_config_args(stats)
    stats.add_argument("--data", help="dataset root (overrides data.root)")
    stats.add_argument("--split", default="train")
    stats.add_argument("--out", help="where to write statistics.json (default: print only)")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON (the default too)")
    stats.set_defaults(handler=cmd_prepare_stats)

    export = verbs.add_parser("export", help="write WebDataset shards (Ray tasks)")
    _add_config_args(export)
    export.add_argument("--data", help="dataset root (overrides data.root)")
    export.add_argument("--out", required=True, help="shard root: local path or s3://")
    export.add_argument("--length", type=int, help="time-series length T (overrides data.length)")
    export.add_argument("--split", nargs="+", default=["train", "val", "test"])
    export.add_argument("--samples-per-shard", type=int, default=64)
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="image precision in the shards (float16 halves their size)")
    export.add_argument("--compress", action="store_true", help="gzip the array members")
    export.add_argument("--all-channels", action="store_true",
                        help="store all nine channels, not only data.channels (one export for any channel subset)")
    export.add_argument("--json", action="store_true", help="print the export summary as JSON")
    export.set_defaults(handler=cmd_export)

    train = verbs.add_parser("train", help="train a model with Ray Train")
    _add_config_args(train)
    train.add_argument("--run-id", help="stable run id (a retried job resumes the same run)")
    train.add_argument("--json", action="store_true", help="print the run's result as JSON")
    train.set_defaults(handler=cmd_train)

    evaluate = verbs.add_parser("evaluate", help="re-evaluate a finished run's best checkpoint")
    evaluate.add_argument("run", help="run id")
    evaluate.add_argument("--store", default="./runs")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--json", action="store_true",
                          help="print run id, split, metrics and the skipped count as JSON")
    evaluate.set_defaults(handler=cmd_evaluate)

    pred = verbs.add_parser("predict", help="run a trained model over whole frames (Ray Data batch inference)")
    pred.add_argument("run", help="run id")
    pred.add_argument("--data", required=True, help="dataset root with the cubes: local path or s3://")
    pred.add_argument("--out", required=True, help="output root: local path or s3:// (rerun to resume)")
    pred.add_argument("--frames", nargs="+", metavar="ID", help="only these frames")
    pred.add_argument("--pairs", default="annotated",
                      help="annotated (the time-series index), all (every pair in the cubes), or YYYYMMDD:YYYYMMDD")
    pred.add_argument("--store", default="./runs")
    pred.add_argument("--overlap", type=float, default=0.25, help="least overlap of neighbouring windows (fraction)")
    pred.add_argument("--batch-size", type=int, help="windows per model call (default: train.batch_size)")
    pred.add_argument("--actors", type=int, default=1, help="model actors (each train.cpus_per_worker CPUs, "
                      "train.gpus_per_worker GPUs on a GPU cluster)")
    pred.add_argument("--threshold", type=float, help="probability counted as deformation (default 0.5, the argmax rule)")
    pred.set_defaults(handler=cmd_predict)

    exp = verbs.add_parser("export-model", help="export a run's model (TorchScript, ONNX, safetensors) + model card")
    exp.add_argument("run", help="run id")
    exp.add_argument("--format", choices=["torchscript", "onnx", "safetensors"], required=True)
    exp.add_argument("--out", required=True, help="file to write; the model card goes beside it (.card.json)")
    exp.add_argument("--store", default="./runs")
    exp.set_defaults(handler=cmd_export_model)

    runs = verbs.add_parser("runs", help="list runs in the experiment store, or show one")
    runs.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    runs.add_argument("run_id", nargs="?")
    runs.add_argument("--store", default="./runs")
    runs.set_defaults(handler=cmd_runs)

    sweep = verbs.add_parser("sweep", help="run a Ray Tune sweep (each trial a Ray Train run)")
    _add_config_args(sweep, required=True)
    sweep.add_argument("--resume", action="store_true", help="resume the newest sweep of this name")
    sweep.add_argument("--sweep-id", help="resume or name this exact sweep")
    sweep.add_argument("--json", action="store_true", help="print the sweep summary as JSON")
    sweep.set_defaults(handler=cmd_sweep)

    board = verbs.add_parser("leaderboard", help="rank stored runs; breakdowns; best config")
    board.add_argument("sweep", nargs="?", default="all", help="a sweep id, or 'all'")
    board.add_argument("--store", default="./runs")
    board.add_argument("--format", choices=["terminal", "markdown", "csv", "json"], default="terminal",
                       help="csv and json: one table, one row per run, full precision")
    board.add_argument("--breakdown", choices=BREAKDOWNS,
                       help="instead: the best run's Deformation metrics per group of this field")
    board.add_argument("--metric", help="ranking metric (default test/f1_deformation or test/iou_deformation)")
    board.add_argument("--mode", choices=["max", "min"], default="max")
    board.add_argument("--best-config", metavar="PATH", help="write the best run's config here")
    board.set_defaults(handler=cmd_leaderboard)

    report = verbs.add_parser("report", help="an HTML report of a run or a sweep (figures, gallery)")
    report.add_argument("target", metavar="RUN_ID|SWEEP_ID")
    report.add_argument("--store", default="./runs")
    report.add_argument("--out", help="folder for index.html (default: the run's or sweep's report/ folder)")
    report.add_argument("--screenshot", action="store_true",
                        help="also check the page in headless Chromium and save screenshot.png beside it")
    report.set_defaults(handler=cmd_report)

    submit = verbs.add_parser("submit", help="submit a job spec through the Ray Jobs API")
    submit.add_argument("spec", help="a job spec, e.g. jobs/train-cls-single.yaml")
    submit.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--follow", action="store_true", help="stream logs and wait for the final status")
    submit.add_argument("--print-ray-command", action="store_true",
                        help="print the equivalent `ray job submit` command instead of submitting")
    submit.set_defaults(handler=cmd_submit)

    jobs = verbs.add_parser("jobs", help="list, stop or show the logs of submitted jobs")
    jobs.add_argument("action", nargs="?", choices=["list", "stop", "logs"], default="list")
    jobs.add_argument("job_id", nargs="?")
    jobs.add_argument("--address")
    jobs.set_defaults(handler=cmd_jobs)

    cluster = verbs.add_parser("cluster", help="cluster configurations").add_subparsers(dest="what", required=True)
    check = cluster.add_parser("validate", help="validate KubeRay manifests and `ray up` configs offline, strictly")
    check.add_argument("files", nargs="+", help="YAML files (KubeRay resources or cluster-launcher configs)")
    check.add_argument("--crds", metavar="PATH", help="KubeRay CRDs: a folder of CRD YAML files or the output of "
                       "`kubectl get crd rayclusters.ray.io rayjobs.ray.io -o yaml` (default: $THALIA_CRDS)")
    check.set_defaults(handler=cmd_cluster_validate)

    demo = verbs.add_parser("demo", help="the end-to-end job on a local single-node Ray")
    demo.add_argument("--workdir", default=".", help="where data/ and runs/ are written")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(handler=cmd_demo)

    bench = verbs.add_parser("bench", help="benchmark suites: the project's path vs its baseline, interleaved")
    bench.add_argument("suite", help="a suite name, or 'list'")
    bench.add_argument("--store", default="./runs", help="experiment store; the record goes to {store}/bench/")
    bench.add_argument("--repeats", type=int, help="interleaved repetitions (default: the suite's)")
    bench.add_argument("--size", choices=["small", "medium", "large"], default="small", help="size preset")
    bench.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="override one preset value, e.g. --param crop=96 (repeatable)")
    bench.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    bench.set_defaults(handler=cmd_bench)
    return parser


def _debug(args: argparse.Namespace) -> bool:
    return bool(args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A `--json` summary must be all of stdout, but Ray prints to the driver's stdout from its own threads
    # (e.g. raylet warnings): everything else written to stdout goes to stderr while the command runs.
    summary = args.handler in JSON_SUMMARIES and args.json
    args.summary_out = sys.stdout
    try:
        # Ctrl-C and SIGTERM: work that can stop at a safe point does, and says how to go on (interrupts).
        with interrupts.handling(), contextlib.redirect_stdout(sys.stderr) if summary else contextlib.nullcontext():
            return args.handler(args)
    except (ThaliaError, OSError) as err:  # a user's mistake or the disk's: one line, no traceback
        if _debug(args):
            raise
        from thalia_ray.runtime import raised_in_task

        shown = raised_in_task(err)
        print(f"thalia-ray: {_bounded(str(shown))}", file=sys.stderr)
        return getattr(shown, "exit_code", StorageProblem.exit_code)  # an OSError is the disk's or the network's


MESSAGE_LIMIT = 4000  # characters of an error printed: a message that quotes input is cut, never the terminal flooded


def _bounded(message: str) -> str:
    """An error message as printed: credentials masked (`credentials.redact`), at most MESSAGE_LIMIT characters."""
    from thalia_ray.credentials import redact

    message = redact(message)
    if len(message) <= MESSAGE_LIMIT:
        return message
    return f"{message[:MESSAGE_LIMIT]}… ({len(message) - MESSAGE_LIMIT:,} more characters; --debug shows all)"


if __name__ == "__main__":
    sys.exit(main())
