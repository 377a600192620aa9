"""The `thalia-ray` command. Thin: it parses arguments and delegates to the modules that do the work.

One grammar for every command:
- `--json` on every command that reports something: one JSON document on stdout and nothing else
  (anything else the command or Ray prints meanwhile goes to stderr);
- `--store LOC` wherever a command reads or writes the experiment store, default `$THALIA_STORE`, else
  `./runs`; commands that take a run configuration use `$THALIA_STORE` for `storage.store` unless the
  file or `--set` gives one;
- an unknown run, sweep or job id, or a store holding no runs, is an error, never an empty result;
- every mistake a user can fix is a `ThaliaError` (argparse's usage errors included) printed as one
  line with the exit status of its kind (see `thalia_ray.errors`).

Handlers import their modules lazily so that `thalia-ray config show` answers without importing torch.
Commands that start Ray run `thalia_ray.preflight` first, so mistakes are reported before any cluster
work. `--debug` or THALIA_DEBUG=1 shows the traceback as well.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from thalia_ray import __version__, interrupts
from thalia_ray.config import ConfigError, ThaliaConfig, load_config
from thalia_ray.data import schema
from thalia_ray.errors import StorageProblem, ThaliaError, UsageError
from thalia_ray.storage import S3Options, resolve
from thalia_ray.store.layout import STORE_ENV, default_location

if TYPE_CHECKING:  # imported lazily by the handlers (see above)
    from thalia_ray.store import ExperimentStore
    from thalia_ray.store.records import Lease

Handler = Callable[[argparse.Namespace], int]
DEBUG_ENV = "THALIA_DEBUG"
PROG = "thalia-ray"
SPLITS = tuple(schema.SPLITS)  # train, val, test
SIGPIPE_STATUS = 141  # what a shell reports for a command ended by SIGPIPE (128 + 13)


def _config(args: argparse.Namespace) -> ThaliaConfig:
    """Defaults, the YAML file, `--set`; then `$THALIA_STORE` as `storage.store` if neither set that."""
    cfg = load_config(getattr(args, "config", None), getattr(args, "set", None) or ())
    if "store" in cfg.storage.model_fields_set or not os.environ.get(STORE_ENV):
        return cfg
    return _with_option(cfg, "storage.store", f"${STORE_ENV}", os.environ[STORE_ENV])


def _settings(args: argparse.Namespace) -> S3Options:
    """The storage settings (endpoint, region, timeouts) of the command's configuration (`_config`),
    resolved once: every location the command names is resolved with them."""
    return S3Options.of(_config(args).storage)


def _store(args: argparse.Namespace) -> ExperimentStore:
    """The store at `--store`, reached with the command's storage settings."""
    from thalia_ray.store import ExperimentStore

    return ExperimentStore(resolve(args.store, _settings(args)))


def _with_option(cfg: ThaliaConfig, path: str, option: str, value: object) -> ThaliaConfig:
    """`cfg` with a command-line option's value at its dotted `path`, validated there; a value the
    configuration refuses is reported in one line under the option the user typed."""
    try:
        return cfg.with_overrides({path: value})
    except ConfigError as err:
        raise ConfigError(f"{option} {value}: " + " ".join(str(err).split())) from None


# ------------------------------------------------------------------------------------- output
def _plain(value: Any) -> Any:
    """JSON types for a command's document: dataclasses as objects, dates in ISO 8601, numpy scalars as
    numbers, NaN and infinities as null (strict JSON, which jq and pandas read as it is)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, date):
        return value.isoformat()
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _emit_json(args: argparse.Namespace, value: object) -> None:
    """The command's one JSON document, on the real stdout (see `main`)."""
    print(json.dumps(_plain(value), indent=2, allow_nan=False), file=args.summary_out)


def _show(args: argparse.Namespace, document: object, text: str) -> None:
    """What a command reports: `document` as JSON with `--json`, else `text` for people."""
    if args.json:
        _emit_json(args, document)
    else:
        print(text)


# ----------------------------------------------------------------------------------- handlers
def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.json:
        _emit_json(args, cfg.model_dump(mode="json"))
    else:
        print(cfg.to_yaml(), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from thalia_ray.models.registry import REGISTRY, smp_encoders, timm_classifiers

    registry = [{"name": name, "family": spec.family, "tasks": list(spec.tasks), "arch": spec.arch}
                for name, spec in REGISTRY.items()]
    installed = {"timm_classifiers": timm_classifiers(), "smp_encoders": smp_encoders()} if args.all else {}
    lines = [f"{m['name']:22s} {m['family']:16s} {'/'.join(m['tasks']):28s} {m['arch']}" for m in registry]
    if installed:
        lines += ["\nclassification, model.name = any timm model (installed timm):", *installed["timm_classifiers"],
                  "\nsegmentation, model.encoder = any smp encoder, or tu-<timm model> (installed smp):",
                  *installed["smp_encoders"]]
    _show(args, {"registry": registry, **installed}, "\n".join(lines))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from thalia_ray import progress
    from thalia_ray.synthetic.generator import synthesize
    from thalia_ray.storage import writing_to

    settings = _settings(args)
    frames = progress.bar(args.frames if not args.frame_ids else len(args.frame_ids), "synth", unit="frame")
    with writing_to(args.out):
        report = synthesize(
            resolve(args.out, settings),
            frames=args.frames,
            size=args.size,
            seed=args.seed,
            meta_dir=resolve(args.from_annotations, settings) if args.from_annotations else None,
            frame_ids=args.frame_ids,
            max_groups_per_frame=args.max_groups,
            workers=args.workers,
            progress=lambda line: frames.update(1) if progress.on_terminal() else print(line, file=sys.stderr),
        )
    frames.close()
    _show(args, report, f"wrote {report.frames} frames, {report.pairs} interferograms, {report.groups} series to "
                        f"{args.out} in {report.seconds:.1f} s")
    return 0


def cmd_prepare_index(args: argparse.Namespace) -> int:
    from thalia_ray.data.annotations import describe_left_out
    from thalia_ray.data.index import index_at
    from thalia_ray.preflight import location_present

    cfg = _with_option(_config(args), "data.length", "--length", args.length)
    index = index_at(location_present(args.data, "--data", S3Options.of(cfg.storage)), cfg.data.length, args.policy)
    counts = index.counts()
    lines = [f"T={args.length} policy={args.policy} data={args.data}",
             f"{'split':8s} {'samples':>9s} {'positives':>10s} {'negatives':>10s}"]
    lines += [f"{split:8s} {row['samples']:9d} {row['positives']:10d} {row['negatives']:10d}"
              for split, row in counts.items()]
    if index.left_out:
        lines.append(f"{describe_left_out(index.left_out)} (--json lists each)")
    # --json: the split rows, and each annotation or series member left out of them
    _show(args, {**counts, "left_out": [item.row() for item in index.left_out]}, "\n".join(lines))
    return 0


def cmd_prepare_chunking(args: argparse.Namespace) -> int:
    """What the cubes' chunking costs per training sample from object storage, and other spatial chunk sides."""
    from dataclasses import asdict

    from thalia_ray.data import chunking, schema
    from thalia_ray.data.cube import get_cache
    from thalia_ray.predict.inputs import frame_ids
    from thalia_ray.tables import render_all

    cfg = _config(args)
    root = resolve(args.data or cfg.data.root, S3Options.of(cfg.storage))
    cube = get_cache(root).get(args.frame or frame_ids(root)[0])
    try:
        report = chunking.chunking_report(cube, [*cfg.data.channels, schema.MASK_VAR], cfg.data.crop, cfg.data.length)
    except ValueError as err:
        raise ThaliaError(str(err)) from None
    _show(args, asdict(report), render_all(report.tables(), "terminal"))
    return 0


def cmd_prepare_rechunk(args: argparse.Namespace) -> int:
    """Rewrite the cubes with another spatial chunk side (fewer, larger GETs per sample from a bucket)."""
    from thalia_ray.data.rechunk import rechunk_dataset
    from thalia_ray.predict.inputs import frame_ids

    cfg = _config(args)
    settings = S3Options.of(cfg.storage)
    source, target = resolve(args.data, settings), resolve(args.out, settings)
    if source.url == target.url:
        raise UsageError("prepare rechunk: --out must differ from --data (the cubes are rewritten, not changed in place)")
    report = rechunk_dataset(source, target, args.chunk, args.frames or frame_ids(source))
    _show(args, report, f"{len(report.cubes)} cubes, {report.planes} planes rechunked to {args.chunk}², "
                        f"{len(report.files)} files copied, {report.seconds:.1f} s → {target}")
    return 0


def cmd_prepare_stats(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray import preflight, runtime
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.stats import compute_statistics

    if args.data:
        cfg = cfg.with_overrides({"data.root": args.data})
    preflight.for_stats(cfg, args.split)
    out = resolve(args.out, S3Options.of(cfg.storage)) if args.out else None
    with runtime.start(cfg.runtime):
        stats = compute_statistics(cfg.data, DataLocations.of(cfg.data, S3Options.of(cfg.storage)), split=args.split,
                                   out=out)
    _emit_json(args, stats)  # the statistics are JSON either way; --json is accepted for uniformity
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray import preflight, runtime
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.shards.export import export_shards

    cfg = cfg.with_overrides({"data.root": args.data}) if args.data else cfg
    if args.length is not None:
        cfg = _with_option(cfg, "data.length", "--length", args.length)
    preflight.for_export(cfg, args.out, args.split, args.samples_per_shard, args.all_channels)
    with runtime.start(cfg.runtime):
        settings = S3Options.of(cfg.storage)
        report = export_shards(cfg.data, DataLocations.of(cfg.data, settings), resolve(args.out, settings),
                               cfg.data.length, splits=tuple(args.split), samples_per_shard=args.samples_per_shard,
                               dtype=args.dtype, compress=args.compress, all_channels=args.all_channels, seed=cfg.seed)
    _show(args, report, f"{report.shards_written} shards written, {report.shards_kept} kept, "
                        f"{sum(report.samples.values())} samples {report.samples}, {report.bytes / 1e6:.1f} MB, "
                        f"{len(report.skipped)} skipped, {len(report.left_out)} left out of the index, {report.seconds:.1f} s → "
                        f"{report.root}")
    return 0


def _leased_run(args: argparse.Namespace, cfg: ThaliaConfig, run: Callable[[ExperimentStore, Lease], object]) -> int:
    """A run of `cfg` under `--run-id` (or a new id): its lease is taken before Ray starts, so a run id
    another driver is writing is refused at once; prints the result (as JSON with `--json`)."""
    from thalia_ray import runtime
    from thalia_ray.store import ExperimentStore

    store = ExperimentStore.of(cfg.storage)
    lease = store.run(args.run_id or store.new_run_id(cfg.name)).acquire()
    try:
        with runtime.start(cfg.runtime):
            result = run(store, lease)
    finally:
        lease.release()
    _show(args, result, str(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray import preflight
    from thalia_ray.train.trainer import fit

    preflight.for_training(cfg, args.run_id)
    return _leased_run(args, cfg, lambda store, lease: fit(cfg, store=store, lease=lease))


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from thalia_ray.pretrain.run import check, pretrain

    objective = check(cfg, args.run_id)  # the plan, the cubes, the network and the store, before Ray starts
    return _leased_run(args, cfg, lambda store, lease: pretrain(cfg, store=store, lease=lease, objective=objective))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from thalia_ray import preflight, runtime
    from thalia_ray.train.evaluate import evaluate_run

    store = _store(args)
    cfg = store.existing_run(args.run).read_config()
    preflight.for_evaluation(cfg, args.split)
    preflight.checkpoint_loads(store, args.run)
    with runtime.start(cfg.runtime):
        result = evaluate_run(store, args.run, split=args.split)
    _show(args, result, str(result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from thalia_ray import runtime
    from thalia_ray.predict.frame_metrics import DEFAULT_THRESHOLD
    from thalia_ray.predict.job import PredictOptions, execute, prepare
    from thalia_ray.preflight import location_present

    settings, store = _settings(args), _store(args)
    cfg = store.existing_run(args.run).read_config()
    data = location_present(args.data, "--data", settings)  # a missing dataset is a dataset error, named as such
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    options = PredictOptions(data=data, out=resolve(args.out, settings), pairs=args.pairs, frames=args.frames, overlap=args.overlap,
                             batch_size=args.batch_size, actors=args.actors, threshold=threshold)
    plan = prepare(store, args.run, options)  # run, frames and pairs are checked before Ray starts
    with runtime.start(cfg.runtime):
        report = execute(store, plan, options)
    _show(args, report, report.summary())
    return 1 if report.failed else 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from thalia_ray.export.model import export_run

    result = export_run(_store(args), args.run, args.format, resolve(args.out, _settings(args)))
    _show(args, result, result.summary())
    return 0


def _reconciled_store(args: argparse.Namespace, target: str | None = None) -> ExperimentStore:
    """The store, once its `running` runs whose driver is gone are marked interrupted (only `target` when
    that is a run; else all, a sweep's trials among them): commands that show runs never show a dead
    one as running."""
    store = _store(args)
    store.reconcile_runs(target if target and store.run(target).exists() else None)
    return store


def cmd_runs(args: argparse.Namespace) -> int:
    from thalia_ray.store import format_run, format_runs_table, run_document

    if args.action == "list":
        if args.run_id:
            raise UsageError(f"runs list takes no run id; `{PROG} runs show {args.run_id}` shows that run")
        summaries = _reconciled_store(args).existing_runs()
        _show(args, summaries, format_runs_table(summaries))
        return 0
    if not args.run_id:
        raise UsageError(f"runs show: give a run id (`{PROG} runs list` lists them)")
    record = _store(args).existing_run(args.run_id)
    record.reconcile()  # a run whose driver is gone is shown as interrupted, never as running
    _show(args, run_document(record), format_run(record))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.sweep is None:
        raise ConfigError(f"{args.config}: no sweep section (a sweep file needs `sweep:` with a search space)")
    from thalia_ray import preflight, runtime
    from thalia_ray.tune.driver import resolve_sweep_id, run_sweep, trials_table
    from thalia_ray.tune.space import varied_fields

    preflight.for_sweep(cfg, args.sweep_id)
    sweep_id = resolve_sweep_id(cfg, args.resume, args.sweep_id)  # an unknown sweep to resume: before Ray starts
    with runtime.start(cfg.runtime):
        summary = run_sweep(cfg, resume=args.resume, sweep_id=sweep_id)
    if args.json:
        _emit_json(args, summary.to_json())
        return 0 if summary.status == "finished" else 1
    print(trials_table(summary, varied_fields(cfg.sweep)))  # every metric: `thalia-ray leaderboard SWEEP_ID`
    print(f"sweep {summary.sweep_id}: {len(summary.trials)} trials, best {summary.best_run} "
          f"({summary.metric} = {summary.best_value}), {summary.worker_seconds:.0f} worker-seconds")
    return 0 if summary.status == "finished" else 1


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from thalia_ray import leaderboard
    from thalia_ray.store import StoreError
    from thalia_ray.tables import render

    store = _reconciled_store(args)
    sweep = None if args.sweep == "all" else store.existing_sweep(args.sweep).sweep_id
    fmt = "json" if args.json else args.format
    chosen = (sweep, args.metric, args.mode, args.task)
    best = leaderboard.best_config(store, *chosen) if args.best_config else None  # its errors before any output
    table = (leaderboard.breakdown_table(store, args.breakdown, *chosen) if args.breakdown
             else leaderboard.runs_table(store, *chosen))
    if not table.rows:  # nothing to rank (a mistyped store, no results yet) is an error, not an empty table
        shown = f"a {args.breakdown} breakdown of the best run" if args.breakdown else "runs with results"
        raise StoreError(f"no {shown} in {store.root.url}" + (f" for sweep {sweep}" if sweep else ""))
    if args.breakdown or fmt in ("csv", "json"):
        print(render(table, fmt), file=args.summary_out)
    else:
        print(leaderboard.leaderboard_text(store, sweep, fmt, args.metric, args.mode, args.task), file=args.summary_out)
    if best is not None:
        resolve(args.best_config, store.root.s3).write_text(best.to_yaml())
        print(f"best configuration written to {args.best_config}", file=sys.stderr)  # stdout: the table only
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from thalia_ray.report.page import write_report

    store = _reconciled_store(args, args.target)
    page = write_report(store, args.target, resolve(args.out, store.root.s3) if args.out else None)
    if not args.json:
        print(page.url)  # before the browser check, which may fail
    shot = None
    if args.screenshot:
        from thalia_ray.report.browser import screenshot_beside

        shot = screenshot_beside(page).url
    if args.json:
        _emit_json(args, {"target": args.target, "page": page.url, "screenshot": shot})
    elif shot:
        print(shot)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from thalia_ray.jobs import load_spec, plain_ray_command, submit

    spec = load_spec(args.spec, args.set)
    if args.print_ray_command:
        command = plain_ray_command(spec, args.address)
        _show(args, {"submission_id": spec.submission_id, "ray_command": command}, command)
        return 0
    outcome = submit(spec, args.address, follow=args.follow)
    _show(args, outcome, outcome.summary())
    return 0 if outcome.succeeded or not args.follow else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from thalia_ray.jobs import format_jobs, job_logs, list_jobs, stop_job

    if args.action == "list":
        if args.job_id:
            raise UsageError(f"jobs list takes no submission id; `{PROG} jobs logs {args.job_id}` shows its logs")
        rows = list_jobs(args.address)
        _show(args, rows, format_jobs(rows))
        return 0
    if not args.job_id:
        raise UsageError(f"jobs {args.action}: give a submission id (`{PROG} jobs list` lists them)")
    if args.action == "stop":
        stopped = stop_job(args.address, args.job_id)
        _show(args, {"submission_id": args.job_id, "stopped": stopped},
              f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
        return 0
    logs = job_logs(args.address, args.job_id)
    _show(args, {"submission_id": args.job_id, "logs": logs}, logs)
    return 0


def cmd_cluster_validate(args: argparse.Namespace) -> int:
    from thalia_ray.manifests import ManifestError, validate_file

    reports = {path: validate_file(path, args.crds) for path in args.files}
    for path, report in reports.items():
        for warning in report.warnings:
            print(f"{PROG}: warning: {path}: {warning}", file=sys.stderr)
    bad = {path: report.problems for path, report in reports.items() if report.problems}
    if args.json:  # every file's verdict, the invalid ones too; the exit status still says whether all are valid
        _emit_json(args, {path: {"valid": not report.problems, "problems": report.problems, "warnings": report.warnings}
                          for path, report in reports.items()})
    if bad:
        raise ManifestError("; ".join(f"{path}: {len(p)} problem(s):\n  " + "\n  ".join(p) for path, p in bad.items()))
    if not args.json:
        print("\n".join(f"{path}: valid" for path in reports))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from thalia_ray.demo import run_demo

    return run_demo(workdir=args.workdir, overrides=args.set)


def cmd_bench(args: argparse.Namespace) -> int:
    from thalia_ray.bench.harness import figure_location, write_record
    from thalia_ray.bench.suites import SUITES, BenchOptions, resolve_params, run_suite

    if args.suite == "list":
        _show(args, {name: suite.summary for name, suite in SUITES.items()},
              "\n".join(f"{name:12s} {suite.summary}" for name, suite in SUITES.items()))
        return 0
    if args.suite not in SUITES:
        raise UsageError(f"bench: no benchmark suite {args.suite!r}; `{PROG} bench list` lists them")
    options = BenchOptions(size=args.size, repeats=args.repeats,
                           params=dict(item.partition("=")[::2] for item in args.param))
    try:
        resolve_params(SUITES[args.suite], options)  # checked before any work starts
    except ValueError as err:
        raise UsageError(str(err)) from None
    result = run_suite(args.suite, options)
    where = write_record(result, resolve(args.store, _settings(args)))
    _show(args, result.to_json(), result.table())
    print(f"record: {where.url}", file=sys.stderr)
    for name in result.figures:
        print(f"figure: {figure_location(where, name).url}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors raised as `UsageError`: one line and status 2, like every other
    mistake (argparse itself would print the whole usage and exit)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{command + ': ' if command else ''}{message}; see `{self.prog} --help`")


def version_line() -> str:
    """This package's version and those a bug report needs, read from metadata (nothing is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(distribution: str) -> str:
        try:
            return version(distribution)
        except PackageNotFoundError:
            return "not installed"

    return f"{PROG} {__version__} (Ray {of('ray')}, PyTorch {of('torch')}, Python {platform.python_version()})"


class _Version(argparse.Action):
    """`--version`: prints `version_line()` on stdout and exits 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(version_line())
        parser.exit()


def _count(text: str) -> int:
    """An argument that counts something: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _in_unit_interval(text: str, *, upper_included: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 <= value <= 1 if upper_included else 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"{value}: must be in [0, 1{']' if upper_included else ')'}")
    return value


def _fraction(text: str) -> float:
    """A share of something, in [0, 1) (e.g. the overlap of neighbouring windows)."""
    return _in_unit_interval(text, upper_included=False)


def _probability(text: str) -> float:
    return _in_unit_interval(text, upper_included=True)


def _add_json(parser: argparse._ActionsContainer, what: str) -> None:  # a parser or an option group
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as one JSON document on stdout (nothing else goes there)")


def _add_store(parser: argparse.ArgumentParser, role: str = "") -> None:
    parser.add_argument("--store", default=default_location(), metavar="LOC",
                        help=f"experiment store: a folder or s3://bucket/prefix (default: ${STORE_ENV}, "
                             f"else ./runs){role}")
    _add_storage_settings(parser)


def _add_storage_settings(parser: argparse.ArgumentParser) -> None:
    """`--config`/`--set` on a command that takes no run configuration: its `storage` section is how the
    command reaches the store and the locations it names (an S3 endpoint, region, timeouts)."""
    parser.add_argument("--config", metavar="CONFIG",
                        help="a run configuration (YAML) whose storage section (endpoint_url, region, timeout_s) "
                             "reaches the locations this command names")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of those settings, e.g. --set storage.endpoint_url=http://host:9000 "
                             "(repeatable)")


def _add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("config", nargs=None if required else "?",
                        help=f"run configuration (YAML); storage.store defaults to ${STORE_ENV} when it sets none")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set train.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from thalia_ray.leaderboard import BREAKDOWNS
    from thalia_ray.metric_names import HEADLINE

    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, help="print the versions of thalia-ray, Ray, PyTorch and "
                        "Python, and exit")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    config = verbs.add_parser("config", help="show the resolved configuration").add_subparsers(
        dest="what", required=True, metavar="ACTION")
    show = config.add_parser("show", help="print the resolved configuration (YAML)")
    _add_config_args(show)
    _add_json(show, "the configuration")
    show.set_defaults(handler=cmd_config_show)

    models = verbs.add_parser("models", help="list the model registry")
    models.add_argument("--all", action="store_true", help="also every timm model and smp encoder installed")
    _add_json(models, "the registry (and with --all the installed models)")
    models.set_defaults(handler=cmd_models)

    synth = verbs.add_parser("synth", help="generate synthetic Thalia minicubes")
    synth.add_argument("--out", required=True, help="dataset root: local path or s3://bucket/prefix")
    synth.add_argument("--frames", type=int, default=4, help="frames to generate (default 4)")
    synth.add_argument("--size", type=int, default=128, help="frame side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--from-annotations", metavar="META_DIR",
                       help="real annotations + time-series index to drive the generator")
    synth.add_argument("--frame-ids", nargs="+", metavar="ID", help="these frames of --from-annotations only")
    synth.add_argument("--max-groups", type=int, default=None, help="time-series groups per frame (default: all)")
    synth.add_argument("--workers", type=int, default=1, help="frames generated in parallel (processes)")
    _add_storage_settings(synth)  # storage settings for an s3:// --out or --from-annotations
    _add_json(synth, "the summary")
    synth.set_defaults(handler=cmd_synth)

    prepare = verbs.add_parser("prepare", help="dataset preparation").add_subparsers(
        dest="what", required=True, metavar="ACTION")
    index = prepare.add_parser("index", help="count samples per split")
    index.add_argument("--data", required=True, help="dataset root or folder with annotations + index")
    index.add_argument("--length", type=int, default=1, help="time-series length T (default 1)")
    index.add_argument("--policy", choices=["enumerate", "resample"], default="enumerate",
                       help="how series of T are drawn from each group (default enumerate)")
    _add_json(index, "the counts")
    _add_config_args(index)  # storage settings (storage.endpoint_url) for an s3:// --data
    index.set_defaults(handler=cmd_prepare_index)
    chunks = prepare.add_parser("chunking", help="GETs and bytes per training sample that the cubes' chunking costs")
    _add_config_args(chunks)  # data.crop, data.length, channels; storage settings for an s3:// --data
    chunks.add_argument("--data", help="dataset root (overrides data.root)")
    chunks.add_argument("--frame", help="the cube to inspect (default: the first)")
    _add_json(chunks, "the costs")
    chunks.set_defaults(handler=cmd_prepare_chunking)
    rechunk = prepare.add_parser("rechunk", help="rewrite the cubes with another spatial chunk side")
    _add_config_args(rechunk)  # storage settings for s3:// locations
    rechunk.add_argument("--data", required=True, help="dataset root to read")
    rechunk.add_argument("--out", required=True, help="dataset root to write (local path or s3://)")
    rechunk.add_argument("--chunk", type=int, required=True, help="spatial chunk side in pixels (capped at the frame)")
    rechunk.add_argument("--frames", nargs="+", metavar="ID", help="only these cubes (default: all)")
    _add_json(rechunk, "what was rewritten")
    rechunk.set_defaults(handler=cmd_prepare_rechunk)
    stats = prepare.add_parser("stats", help="recompute statistics.json (a Ray job)")
    _add_config_args(stats)
    stats.add_argument("--data", help="dataset root (overrides data.root)")
    stats.add_argument("--split", choices=SPLITS, default="train", help="split the statistics come from")
    stats.add_argument("--out", help="where to write statistics.json (default: print only)")
    _add_json(stats, "the statistics (the default too)")
    stats.set_defaults(handler=cmd_prepare_stats, json=True)  # JSON either way, so stdout holds only it

    export = verbs.add_parser("export", help="write WebDataset shards (Ray tasks)")
    _add_config_args(export)
    export.add_argument("--data", help="dataset root (overrides data.root)")
    export.add_argument("--out", required=True, help="shard root: local path or s3://")
    export.add_argument("--length", type=int, help="time-series length T (overrides data.length)")
    export.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to export")
    export.add_argument("--samples-per-shard", type=int, default=64, help="samples per tar (default 64)")
    export.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="image precision in the shards (float16 halves their size)")
    export.add_argument("--compress", action="store_true", help="gzip the array members")
    export.add_argument("--all-channels", action="store_true",
                        help="store all nine channels, not only data.channels (one export for any channel subset)")
    _add_json(export, "the export summary")
    export.set_defaults(handler=cmd_export)

    train = verbs.add_parser("train", help="train a model with Ray Train")
    _add_config_args(train)
    train.add_argument("--run-id", help="stable run id (a retried job resumes the same run)")
    _add_json(train, "the run's result")
    train.set_defaults(handler=cmd_train)

    pre = verbs.add_parser("pretrain", help="self-supervised pretraining on every interferogram (Ray Train)")
    _add_config_args(pre, required=True)
    pre.add_argument("--run-id", help="stable run id (a retried job resumes the same run)")
    _add_json(pre, "the run's result")
    pre.set_defaults(handler=cmd_pretrain)

    evaluate = verbs.add_parser("evaluate", help="re-evaluate a finished run's best checkpoint")
    evaluate.add_argument("run", metavar="RUN_ID", help="run id")
    _add_store(evaluate)
    evaluate.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate on (default test)")
    _add_json(evaluate, "run id, split, metrics and the skipped count")
    evaluate.set_defaults(handler=cmd_evaluate)

    pred = verbs.add_parser("predict", help="run a trained model over whole frames (Ray Data batch inference)")
    pred.add_argument("run", metavar="RUN_ID", help="run id")
    pred.add_argument("--data", required=True, help="dataset root with the cubes: local path or s3://")
    pred.add_argument("--out", required=True, help="output root: local path or s3:// (rerun to resume)")
    pred.add_argument("--frames", nargs="+", metavar="ID", help="only these frames")
    pred.add_argument("--pairs", default="annotated",
                      help="annotated (the time-series index), all (every pair in the cubes), or YYYYMMDD:YYYYMMDD")
    _add_store(pred)
    pred.add_argument("--overlap", type=_fraction, default=0.25,
                      help="least overlap of neighbouring windows, in [0, 1) (default 0.25)")
    pred.add_argument("--batch-size", type=_count, help="windows per model call (default: train.batch_size)")
    pred.add_argument("--actors", type=_count, default=1, help="model actors (each train.cpus_per_worker CPUs, "
                      "train.gpus_per_worker GPUs on a GPU cluster)")
    pred.add_argument("--threshold", type=_probability,
                      help="probability counted as deformation, in [0, 1] (default 0.5, the argmax rule)")
    _add_json(pred, "the summary (units planned, written, failed; whole-frame evaluation)")
    pred.set_defaults(handler=cmd_predict)

    exp = verbs.add_parser("export-model", help="export a run's model (TorchScript, ONNX, safetensors) + model card")
    exp.add_argument("run", metavar="RUN_ID", help="run id")
    exp.add_argument("--format", choices=["torchscript", "onnx", "safetensors"], required=True, help="model format")
    exp.add_argument("--out", required=True, help="file to write; the model card goes beside it (.card.json)")
    _add_store(exp)
    _add_json(exp, "where the model and its card were written, and the parity check")
    exp.set_defaults(handler=cmd_export_model)

    runs = verbs.add_parser("runs", help="list runs in the experiment store, or show one")
    runs.add_argument("action", nargs="?", choices=["list", "show"], default="list",
                      help="list (default) or show RUN_ID")
    runs.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the run to show")
    _add_store(runs)
    _add_json(runs, "the runs (list) or all of a run's records (show)")
    runs.set_defaults(handler=cmd_runs)

    sweep = verbs.add_parser("sweep", help="run a Ray Tune sweep (each trial a Ray Train run)")
    _add_config_args(sweep, required=True)
    sweep.add_argument("--resume", action="store_true", help="resume the newest sweep of this name")
    sweep.add_argument("--sweep-id", help="resume or name this exact sweep")
    _add_json(sweep, "the sweep summary")
    sweep.set_defaults(handler=cmd_sweep)

    board = verbs.add_parser("leaderboard", help="rank stored runs; breakdowns; best config")
    board.add_argument("sweep", nargs="?", default="all", metavar="SWEEP_ID|all", help="a sweep id, or all (default)")
    _add_store(board)
    shape = board.add_mutually_exclusive_group()
    shape.add_argument("--format", choices=["terminal", "markdown", "csv", "json"], default="terminal",
                       help="csv and json: one table, one row per run, full precision")
    _add_json(shape, "the table (the same as --format json)")
    board.add_argument("--breakdown", choices=BREAKDOWNS,
                       help="instead: the best run's Deformation metrics per group of this field")
    board.add_argument("--metric", help="validation metric to rank by (default: a sweep's Tune metric, else "
                                        "val/f1_deformation or val/iou_deformation by task); test metrics never rank")
    board.add_argument("--mode", choices=["max", "min"], help="with --metric (default: min for a loss, else max)")
    board.add_argument("--task", choices=list(HEADLINE), help="only runs of this task (each task is ranked apart)")
    board.add_argument("--best-config", metavar="PATH", help="write the best run's config here")
    board.set_defaults(handler=cmd_leaderboard)

    report = verbs.add_parser("report", help="an HTML report of a run or a sweep (figures, gallery)")
    report.add_argument("target", metavar="RUN_ID|SWEEP_ID", help="the run or sweep to report")
    _add_store(report)
    report.add_argument("--out", help="folder for index.html (default: the run's or sweep's report/ folder)")
    report.add_argument("--screenshot", action="store_true",
                        help="also check the page in headless Chromium and save screenshot.png beside it")
    _add_json(report, "where the page (and screenshot) were written")
    report.set_defaults(handler=cmd_report)

    submit = verbs.add_parser("submit", help="submit a job spec through the Ray Jobs API")
    submit.add_argument("spec", help="a job spec, e.g. jobs/train-cls-single.yaml")
    submit.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override of the job's run configuration (repeatable)")
    submit.add_argument("--follow", action="store_true", help="stream logs and wait for the final status")
    submit.add_argument("--print-ray-command", action="store_true",
                        help="print the equivalent `ray job submit` command instead of submitting")
    _add_json(submit, "the submission's outcome (or the ray command)")
    submit.set_defaults(handler=cmd_submit)

    jobs = verbs.add_parser("jobs", help="list, stop or show the logs of submitted jobs")
    jobs.add_argument("action", nargs="?", choices=["list", "stop", "logs"], default="list",
                      help="list (default), stop ID or logs ID")
    jobs.add_argument("job_id", nargs="?", metavar="ID", help="submission id (stop, logs)")
    jobs.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    _add_json(jobs, "the jobs, the stop request's result or the logs")
    jobs.set_defaults(handler=cmd_jobs)

    cluster = verbs.add_parser("cluster", help="cluster configurations").add_subparsers(
        dest="what", required=True, metavar="ACTION")
    check = cluster.add_parser("validate", help="validate KubeRay manifests and `ray up` configs offline, strictly")
    check.add_argument("files", nargs="+", metavar="FILE",
                       help="YAML files (KubeRay resources or cluster-launcher configs)")
    check.add_argument("--crds", metavar="PATH", help="KubeRay CRDs: a folder of CRD YAML files or the output of "
                       "`kubectl get crd rayclusters.ray.io rayjobs.ray.io -o yaml` (default: $THALIA_CRDS)")
    _add_json(check, "each file's verdict and problems")
    check.set_defaults(handler=cmd_cluster_validate)

    demo = verbs.add_parser("demo", help="the end-to-end job on a local single-node Ray")
    demo.add_argument("--workdir", default=".", help="where data/ and runs/ are written")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="dotted override of the demo's configuration (repeatable)")
    demo.set_defaults(handler=cmd_demo)

    bench = verbs.add_parser("bench", help="benchmark suites: the project's path vs its baseline, interleaved")
    bench.add_argument("suite", help="a suite name, or list")
    _add_store(bench, "; the record goes to {store}/bench/")
    bench.add_argument("--repeats", type=_count, help="interleaved repetitions (default: the suite's)")
    bench.add_argument("--size", choices=["small", "medium", "large"], default="small", help="size preset")
    bench.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="override one preset value, e.g. --param crop=96 (repeatable)")
    _add_json(bench, "the record (or the suites, for list)")
    bench.set_defaults(handler=cmd_bench)
    return parser


def _debug(args: argparse.Namespace | None) -> bool:
    return bool((args is not None and args.debug) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        # A `--json` document must be all of stdout, but Ray prints to the driver's stdout from its own
        # threads (e.g. raylet warnings): everything else written to stdout goes to stderr meanwhile.
        args.summary_out = sys.stdout
        # Ctrl-C and SIGTERM: work that can stop at a safe point does, and says how to go on (interrupts).
        with interrupts.handling(), \
                contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else contextlib.nullcontext():
            return args.handler(args)
    except BrokenPipeError:  # the reader went away (`thalia-ray runs | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # nothing left to flush at exit
        return SIGPIPE_STATUS
    except (ThaliaError, OSError) as err:  # a user's mistake or the disk's: one line, no traceback
        if _debug(args):
            raise
        from thalia_ray.runtime import raised_in_task

        shown = raised_in_task(err)
        print(f"{PROG}: {_bounded(str(shown))}", file=sys.stderr)
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
