"""Bad inputs through the CLI: each is answered in one line naming the culprit, with its kind's exit
status, before Ray starts.

Cases run in-process through `cli.main`; `runtime.start` is replaced by a tripwire, so a case that got
past the checks and tried to start Ray fails loudly instead of training. One case runs as a real
subprocess to check the status and output a shell sees.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from thalia_ray import cli, runtime
from thalia_ray.config import DataConfig
from thalia_ray.data.shards import manifest as shard_io
from thalia_ray.errors import (
    ConfigProblem,
    DataProblem,
    JobSpecProblem,
    ManifestProblem,
    ShardProblem,
    StorageProblem,
    StoreProblem,
)

CONFIG, DATA, SHARDS = ConfigProblem.exit_code, DataProblem.exit_code, ShardProblem.exit_code
STORAGE, STORE, JOBSPEC = StorageProblem.exit_code, StoreProblem.exit_code, JobSpecProblem.exit_code
MANIFEST = ManifestProblem.exit_code
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]  # `{root}`, `{tmp}`, `{bucket}` are filled in per test
    code: int
    culprit: str  # must appear in the message
    setup: Callable[[Path, Path | None], None] | None = None  # (tmp, root) → writes the bad input
    hidden: str = ""  # must appear in neither stdout nor stderr (a secret the input holds)


def _write(rel: str, content: bytes | str) -> Callable[[Path, Path | None], None]:
    def setup(tmp: Path, root: Path | None) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _manifest(**changes: object) -> Callable[[Path, Path], None]:
    """An export's manifest (T=1) that differs from the default config in `changes`."""
    manifest = {"format": shard_io.FORMAT, "label_rule": "union", "splits": ["train", "val", "test"],
                "channels": DataConfig().channels, "shards": [], **changes}
    return _write(f"shards/1/{shard_io.MANIFEST}", json.dumps(manifest))


@dataclass(frozen=True)
class RootCopy:
    """A setup: the synthetic dataset copied to `{tmp}/{folder}`, then damaged by `change(copy)`."""

    folder: str
    change: Callable[[Path], object]

    def __call__(self, tmp: Path, root: Path | None) -> None:
        assert root is not None
        shutil.copytree(root, tmp / self.folder)
        self.change(tmp / self.folder)


def _without(variable: str, declared: bool = False) -> Callable[[Path], None]:
    """Every cube without `variable`'s array; `declared`: still listed in the consolidated metadata (its
    folder deleted or never uploaded), else the cube as written without it."""
    def change(copy: Path) -> None:
        for cube in copy.glob("*.zarr"):
            shutil.rmtree(cube / variable)
            if not declared:
                meta = json.loads((cube / "zarr.json").read_text())
                del meta["consolidated_metadata"]["metadata"][variable]
                (cube / "zarr.json").write_text(json.dumps(meta))
    return change


def _unfinished_run(tmp: Path, root: Path | None) -> None:
    from thalia_ray.store import ExperimentStore

    ExperimentStore(str(tmp / "runs")).run("halfway").set_status("failed", error="killed")


def _live_lease(tmp: Path, root: Path | None) -> None:
    """Run `busy` held by a live driver on this machine (this test's parent process, heartbeat now)."""
    import dataclasses
    import os

    from thalia_ray.store import ExperimentStore
    from thalia_ray.store.records import Holder, _process_start

    parent = os.getppid()
    holder = dataclasses.replace(Holder.this_process("another-driver"), pid=parent, pid_start=_process_start(parent))
    ExperimentStore(str(tmp / "runs")).run("busy").write_lease(holder)


def _store_file(tmp: Path, root: Path | None) -> None:
    (tmp / "afile").write_text("not a folder")


def _configured_run(checkpoint: str | None = None) -> Callable[[Path, Path | None], None]:
    """Run `configured` with its config (on the synthetic dataset when there is one) and, given a
    `checkpoint` path, finished with results pointing at it."""
    def setup(tmp: Path, root: Path | None) -> None:
        from thalia_ray.config import ThaliaConfig
        from thalia_ray.store import ExperimentStore

        record = ExperimentStore(str(tmp / "runs")).run("configured")
        record.write_config(ThaliaConfig.model_validate({"data": {"root": str(root or tmp / "data"), "crop": 32}}))
        record.set_status("running")
        if checkpoint is not None:
            record.write_results({"val/f1_deformation": 0.5}, best_epoch=1, best_checkpoint=checkpoint.format(tmp=tmp))
            record.set_status("finished")
    return setup


def _all(*setups: Callable[[Path, Path | None], None]) -> Callable[[Path, Path | None], None]:
    def setup(tmp: Path, root: Path | None) -> None:
        for each in setups:
            each(tmp, root)
    return setup


def _finished_run(tmp: Path, root: Path | None) -> None:
    from thalia_ray.store import ExperimentStore

    ExperimentStore(str(tmp / "runs")).run("done").set_status("finished")


def _damaged_run(tmp: Path, root: Path | None) -> None:
    from thalia_ray.store import ExperimentStore

    record = ExperimentStore(str(tmp / "runs")).run("broken")
    record.set_status("failed", error="x")
    record.loc.join("run.json").write_text("[1, 2]")


def _billion_laughs(tmp: Path, root: Path | None) -> None:
    from tests.helpers import billion_laughs

    (tmp / "laughs.yaml").write_text(billion_laughs())


def _manifest_with(old: str, new: str) -> Callable[[Path, Path | None], None]:
    def setup(tmp: Path, root: Path | None) -> None:
        text = (REPO / "cluster/kuberay/raycluster.yaml").read_text()
        assert old in text
        (tmp / "rc.yaml").write_text(text.replace(old, new))
    return setup


def _run_with_checkpoint(content: str, status: str = "finished", snapshot: bool = False) -> Callable[[Path, Path | None], None]:
    """Run `ckpt` on {root}: a checkpoint whose state.pt is `content` (see tests.helpers.bad_checkpoint), recorded
    as the run's best (finished) or as the latest in Ray's snapshot (an interrupted run to resume)."""
    def setup(tmp: Path, root: Path | None) -> None:
        from tests.helpers import bad_checkpoint
        from thalia_ray.config import load_config
        from thalia_ray.store import ExperimentStore

        store = ExperimentStore(str(tmp / "runs"))
        record = store.run("ckpt")
        record.write_config(load_config(None, [f"data.root={root}", f"storage.store={tmp}/runs", "train.batch_size=2"]))
        folder = tmp / "runs" / "ray" / "ckpt" / "checkpoint_2026-01-01_00-00-00.000000"
        bad_checkpoint(folder / "state.pt", content, tmp / "pwned")
        if snapshot:
            (folder.parent / "checkpoint_manager_snapshot.json").write_text(json.dumps(
                {"latest_checkpoint_result": {"checkpoint_dir_name": folder.name}}))
        else:
            record.write_results({"val/f1_deformation": 0.5}, best_epoch=1, best_checkpoint=str(folder))
        record.set_status(status)
    setup.needs_root = True  # type: ignore[attr-defined]
    return setup


def _unknown_activity_on_positives(copy: Path) -> None:
    """Every positive annotation with an activity type the vocabulary does not have."""
    path = copy / "annotations.json"
    records = json.loads(path.read_text())
    for raw in records.values():
        if "Non_Deformation" not in raw["label"]:
            raw["activity_type"] = ["Volcanic_Explosion"]
    path.write_text(json.dumps(records))


def _all_nan(variable: str) -> Callable[[Path], None]:
    """Every cube's `variable` without a chunk: all NaN, which Zarr does not write."""
    def change(copy: Path) -> None:
        for cube in copy.glob("*.zarr"):
            shutil.rmtree(cube / variable / "c")
    return change


AWS_ID, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documentation examples
HF_TOKEN, GH_TOKEN = "hf_" + "aBcDeFgHiJ" * 3 + "kLmN", "ghp_" + "a1B2c3D4e5" * 4


def _spec_with_env(**env: str) -> Callable[[Path, Path | None], None]:
    """A job spec whose runtime_env holds `env` under harmless names."""
    lines = "".join(f"    {name}: '{value}'\n" for name, value in env.items())
    return _write("job.yaml", _SPEC + f"runtime_env:\n  working_dir: {REPO}\n  env_vars:\n{lines}")


_TRAIN = ["train", "--set", "data.root={root}", "--set", "storage.store={tmp}/runs", "--set", "train.batch_size=2"]
_SHARDS = [*_TRAIN, "--set", "data.source=shards", "--set", "data.shards={tmp}/shards"]
_SPEC = "name: x\nentrypoint: thalia-ray train\n"
_SWEEP = "sweep: {name: lr-sweep, space: {train.lr: {grid: [0.001, 0.01]}}}\n"
_STORE = ["--store", "{tmp}/runs"]
_PREDICT = ["predict", "configured", "--out", "{tmp}/predicted", *_STORE]

CASES = [
    # configuration files and overrides
    Case("config file missing", ["config", "show", "{tmp}/nope.yaml"], CONFIG, "nope.yaml"),
    Case("config is a folder", ["config", "show", "{tmp}"], CONFIG, "is a folder"),
    Case("config is binary", ["config", "show", "{tmp}/bin.yaml"], CONFIG, "bin.yaml: not a text file",
         _write("bin.yaml", bytes(range(256)) * 4)),
    Case("config YAML malformed", ["config", "show", "{tmp}/bad.yaml"], CONFIG, "bad.yaml: not valid YAML",
         _write("bad.yaml", "train: {epochs: 3\n")),
    Case("config top level a list", ["config", "show", "{tmp}/list.yaml"], CONFIG, "top level must be a mapping",
         _write("list.yaml", "- train\n")),
    Case("config with a python tag", ["config", "show", "{tmp}/tag.yaml"], CONFIG, "tag.yaml",
         _write("tag.yaml", "train: !!python/object/apply:os.system ['true']\n")),
    Case("config an alias bomb", ["config", "show", "{tmp}/laughs.yaml"], CONFIG,
         "laughs.yaml: not valid YAML: the block at line 6 expands to more than 100,000 values", _billion_laughs),
    Case("config file empty", ["config", "show", "{tmp}/empty.yaml"], CONFIG, "empty.yaml: empty",
         _write("empty.yaml", "")),
    Case("config file of comments only", ["train", "{tmp}/empty.yaml"], CONFIG, "empty.yaml: empty (no sections",
         _write("empty.yaml", "# train: {epochs: 3}\n\n")),
    Case("config with a duplicate key", ["config", "show", "{tmp}/dup.yaml"], CONFIG,
         "dup.yaml: not valid YAML: duplicate key 'train' at line 3", _write("dup.yaml", "train:\n  epochs: 1\n"
                                                                             "train:\n  epochs: 5\n")),
    Case("config with a recursive alias", ["config", "show", "{tmp}/loop.yaml"], CONFIG, "an alias (*name) of itself",
         _write("loop.yaml", "train: &t\n  x: *t\n")),
    Case("--set of a huge bad value", ["config", "show", "--set", "train.lr=" + "9" * 5000 + "x"], CONFIG,
         "(5,001 characters)"),
    Case("config with a key in the store URL", ["config", "show", "--set", f"storage.store=s3://{AWS_ID}/runs"],
         CONFIG, "storage.store (an AWS access key id)", hidden=AWS_ID),
    Case("--set unterminated list", ["config", "show", "--set", "train.epochs=[1"], CONFIG, "train.epochs=[1"),
    Case("--set without =", ["config", "show", "--set", "train.epochs"], CONFIG, "'train.epochs'"),
    Case("--set unknown field", ["config", "show", "--set", "train.epoch=3"], CONFIG, "train.epoch"),
    Case("--set bad value", ["config", "show", "--set", "train.lr=-1"], CONFIG, "train.lr"),
    Case("--set unknown model", ["config", "show", "--set", "model.name=nope"], CONFIG, "'nope'"),
    Case("sweep without a sweep section", ["sweep", "{tmp}/plain.yaml"], CONFIG, "no sweep section",
         _write("plain.yaml", "train: {epochs: 1}\n")),
    Case("synth frames too small", ["synth", "--out", "{tmp}/s", "--size", "8"], CONFIG, "--size 8"),
    Case("synth of no frames", ["synth", "--out", "{tmp}/s", "--frames", "0"], CONFIG, "--frames 0"),
    Case("synth frame ids without annotations", ["synth", "--out", "{tmp}/s", "--frame-ids", "F1"], CONFIG,
         "--frame-ids needs --from-annotations"),
    # the dataset
    Case("data root missing", [*_TRAIN[:2], "data.root={tmp}/nothing", *_TRAIN[3:]], DATA, "data.root"),
    Case("data root without metadata", [*_TRAIN[:2], "data.root={tmp}/empty", *_TRAIN[3:]], DATA,
         "no annotations", _write("empty/readme.txt", "")),
    Case("annotations not JSON", [*_TRAIN[:2], "data.root={tmp}/broken", *_TRAIN[3:]], STORAGE,
         "annotations.json", RootCopy("broken", lambda copy: (copy / "annotations.json").write_text("{oops"))),
    Case("cube missing", [*_TRAIN[:2], "data.root={tmp}/partial", *_TRAIN[3:]], DATA, ".zarr",
         RootCopy("partial", lambda copy: shutil.rmtree(next(copy.glob("*.zarr"))))),
    Case("cubes without a configured channel", [*_TRAIN[:2], "data.root={tmp}/nodem", *_TRAIN[3:]], DATA,
         "['dem'] read for data.geomorphology", RootCopy("nodem", _without("dem"))),
    Case("cubes whose channel folder is gone", [*_TRAIN[:2], "data.root={tmp}/stale", *_TRAIN[3:], "--set",
                                                "data.atmospheric=[surface_pressure]"], DATA,
         "['primary_date_surface_pressure'] read for data.atmospheric",
         RootCopy("stale", _without("primary_date_surface_pressure", declared=True))),
    Case("cubes whose mask folder is gone", [*_TRAIN[:2], "data.root={tmp}/nomask", *_TRAIN[3:]], DATA,
         "['deformation_mask'] read for the labels", RootCopy("nomask", _without("deformation_mask", declared=True))),
    Case("export of all channels from cubes without one", ["export", "--data", "{tmp}/noera", "--all-channels",
                                                           "--out", "{tmp}/out"], DATA, "--all-channels",
         RootCopy("noera", _without("secondary_date_surface_pressure"))),
    Case("annotations losing every positive", [*_TRAIN[:2], "data.root={tmp}/act", *_TRAIN[3:]], DATA,
         "the train split lost all 9 of its positive annotations: 9 annotations left out of the index (field "
         "'activity_type' ×9)", RootCopy("act", _unknown_activity_on_positives)),
    Case("prepare index losing every positive", ["prepare", "index", "--data", "{tmp}/act"], DATA,
         "split lost all", RootCopy("act", _unknown_activity_on_positives)),
    Case("cubes whose phase is all NaN", [*_TRAIN[:2], "data.root={tmp}/nan", *_TRAIN[3:]], DATA,
         "variable(s) ['insar_difference'] hold no data at all", RootCopy("nan", _all_nan("insar_difference"))),
    Case("statistics missing", [*_TRAIN, "--set", "data.statistics={tmp}/nope.json"], DATA, "data.statistics"),
    Case("default statistics missing", [*_TRAIN[:2], "data.root={tmp}/nostats", *_TRAIN[3:]], DATA,
         "prepare stats", RootCopy("nostats", lambda copy: (copy / "statistics.json").unlink())),
    Case("statistics without a channel", [*_TRAIN, "--set", "data.statistics={tmp}/stats.json"], DATA,
         "no entry for ['insar_coherence', 'insar_difference']",
         _write("stats.json", '{"dem": {"mean": 0, "std": 1}}')),
    Case("statistics with a zero std", [*_TRAIN, "--set", "data.statistics={tmp}/stats.json"], DATA,
         "positive std", _write("stats.json", '{"dem": {"mean": 0, "std": 0}}')),
    Case("crop larger than frames", [*_TRAIN, "--set", "data.crop=4096"], CONFIG, "data.crop 4096"),
    Case("export crop larger than frames", ["export", "--data", "{root}", "--set", "data.crop=4096",
                                            "--out", "{tmp}/out"], CONFIG, "data.crop 4096"),
    Case("frames filter leaves nothing", [*_TRAIN, "--set", "data.frames=[NOPE_FRAME]"], DATA, "no samples"),
    Case("batch too large for the data", [*_TRAIN, "--set", "train.batch_size=4096"], CONFIG, "train.batch_size=4096"),
    Case("pretrained run absent", [*_TRAIN, "--set", "model.pretrained=run:ghost"], CONFIG,
         "model.pretrained 'run:ghost': no run 'ghost'"),
    Case("pretrained run without a best checkpoint", [*_TRAIN, "--set", "model.pretrained=run:halfway"], CONFIG,
         "model.pretrained 'run:halfway': run halfway has no best checkpoint", _unfinished_run),
    Case("synth frame not in the annotations", ["synth", "--out", "{tmp}/s", "--from-annotations", "{root}",
                                                 "--frame-ids", "NOPE"], CONFIG, "--frame-ids: frame(s) ['NOPE']"),
    Case("synth annotations folder missing", ["synth", "--out", "{tmp}/s", "--from-annotations", "{tmp}/nope"],
         DATA, "--from-annotations"),
    Case("run id another live driver writes", [*_TRAIN, "--run-id", "busy"], STORE,
         "run busy is already being written by pid", _live_lease),
    Case("pretrained file missing", [*_TRAIN, "--set", "model.pretrained={tmp}/nope.pt"], CONFIG,
         "nope.pt' is not a local file"),
    Case("export with no samples per shard", ["export", "--data", "{root}", "--samples-per-shard", "0", "--out",
                                              "{tmp}/o"], CONFIG, "--samples-per-shard 0"),
    Case("export with negative samples per shard", ["export", "--data", "{root}", "--samples-per-shard", "-3",
                                                    "--out", "{tmp}/o"], CONFIG, "--samples-per-shard -3"),
    Case("export with a zero length", ["export", "--data", "{root}", "--length", "0", "--out", "{tmp}/o"], CONFIG,
         "--length 0"),
    Case("prepare index with a zero length", ["prepare", "index", "--data", "{root}", "--length", "0"], CONFIG,
         "--length 0"),
    Case("prepare index on an empty folder", ["prepare", "index", "--data", "{tmp}/empty"], DATA, "no annotations",
         _write("empty/readme.txt", "")),
    Case("prepare index on a missing folder", ["prepare", "index", "--data", "{tmp}/nothing"], DATA, "--data"),
    Case("stats of an unknown split", ["prepare", "stats", "--data", "{root}", "--split", "holdout"], CONFIG,
         "holdout"),
    Case("export of an unknown split", ["export", "--data", "{root}", "--split", "holdout", "--out", "{tmp}/o"],
         CONFIG, "holdout"),
    Case("missing bucket as data root", [*_TRAIN[:2], "data.root={bucket}-absent/thalia", *_TRAIN[3:]], STORAGE,
         "bucket"),
    Case("data root prefix absent in a bucket", [*_TRAIN[:2], "data.root={bucket}/nothing-here", *_TRAIN[3:]], DATA,
         "nothing-here"),
    Case("stats of a missing root", ["prepare", "stats", "--data", "{tmp}/nothing"], DATA, "data.root"),
    # shards
    Case("shards never exported", _SHARDS, SHARDS, "data.shards"),
    Case("shards folder without manifest", _SHARDS, SHARDS, "no shard manifest", _write("shards/1/x.txt", "")),
    Case("shards lack a channel", [*_SHARDS, "--set", "data.atmospheric=[surface_pressure]"], SHARDS,
         "surface_pressure", _manifest()),
    Case("shards with another label rule", [*_SHARDS, "--set", "data.label_rule=last"], SHARDS, "label_rule",
         _manifest()),
    Case("shards without the test split", _SHARDS, SHARDS, "'test'", _manifest(splits=["train", "val"])),
    Case("published shards absent", [*_SHARDS, "--set", "data.source=published"], SHARDS,
         "no published shards", _write("shards/readme.txt", "")),
    # the experiment store
    Case("store is a file", [*_TRAIN[:4], "storage.store={tmp}/afile", *_TRAIN[5:]], STORE, "afile", _store_file),
    Case("store below a file", [*_TRAIN[:4], "storage.store={tmp}/afile/runs", *_TRAIN[5:]], STORE, "afile",
         _store_file),
    Case("run id with a slash", [*_TRAIN, "--run-id", "a/b"], STORE, "'a/b'"),
    Case("run id of 300 characters", [*_TRAIN, "--run-id", "r" * 300], STORE,
         "(300 characters) is too long: at most 128 characters"),
    Case("run id of a finished run", [*_TRAIN, "--run-id", "done"], STORE, "run done is already finished",
         _finished_run),
    Case("run id of a damaged record", [*_TRAIN, "--run-id", "broken"], STORE,
         "broken/run.json: damaged record: expected a JSON object", _damaged_run),
    Case("show a damaged run", ["runs", "show", "broken", "--store", "{tmp}/runs"], STORE,
         "broken/run.json: damaged record", _damaged_run),
    Case("export into a file", ["export", "--data", "{root}", "--out", "{tmp}/afile"], STORE, "afile", _store_file),
    Case("show an unknown run", ["runs", "show", "ghost", "--store", "{tmp}/runs"], STORE, "ghost"),
    Case("export a model from a hostile checkpoint", ["export-model", "ckpt", "--format", "safetensors", "--out",
                                                      "{tmp}/m.safetensors", "--store", "{tmp}/runs"], STORE,
         "state.pt: it holds a pickled object ('posix.system')", _run_with_checkpoint("payload")),
    Case("export a model from random bytes", ["export-model", "ckpt", "--format", "onnx", "--out", "{tmp}/m.onnx",
                                              "--store", "{tmp}/runs"], STORE,
         "state.pt: it is damaged or not a PyTorch checkpoint", _run_with_checkpoint("random")),
    Case("evaluate a hostile checkpoint", ["evaluate", "ckpt", "--store", "{tmp}/runs"], STORE,
         "state.pt: it holds a pickled object", _run_with_checkpoint("payload")),
    Case("predict with a checkpoint cut short", ["predict", "ckpt", "--data", "{root}", "--out", "{tmp}/p", "--store",
                                                 "{tmp}/runs"], STORE, "state.pt: it is damaged",
         _run_with_checkpoint("truncated")),
    Case("resume from a hostile checkpoint", [*_TRAIN, "--run-id", "ckpt"], STORE,
         "run ckpt cannot resume from its latest checkpoint: checkpoint", _run_with_checkpoint("payload", "interrupted",
                                                                                               snapshot=True)),
    Case("evaluate an unknown run", ["evaluate", "ghost", "--store", "{tmp}/runs"], STORE, "ghost"),
    # unknown ids and stores that hold nothing: an error of the store's kind, never an empty result
    Case("list a store holding no runs", ["runs", "list", "--store", "{tmp}/typo"], STORE,
         "/typo: is the store location (--store, THALIA_STORE) right?"),
    Case("list a store holding no runs, as JSON", ["runs", "--json", "--store", "{tmp}/typo"], STORE, "no runs in"),
    Case("rank a store holding no runs", ["leaderboard", "--store", "{tmp}/typo"], STORE, "no runs with results"),
    Case("rank a store holding no runs, as JSON", ["leaderboard", "--json", "--store", "{tmp}/typo"], STORE,
         "no runs with results"),
    Case("rank a store holding no runs, as CSV", ["leaderboard", "--format", "csv", "--store", "{tmp}/typo"], STORE,
         "no runs with results"),
    Case("rank runs without results", ["leaderboard", *_STORE], STORE, "no runs with results", _unfinished_run),
    Case("rank an unknown sweep", ["leaderboard", "nosweep", *_STORE], STORE, "no sweep 'nosweep'",
         _unfinished_run),
    Case("best config of an unknown sweep", ["leaderboard", "nosweep", "--best-config", "{tmp}/best.yaml", *_STORE],
         STORE, "no sweep 'nosweep'", _unfinished_run),
    Case("report of an unknown id", ["report", "nosuch", *_STORE], STORE, "'nosuch'", _unfinished_run),
    Case("export an unknown run's model", ["export-model", "ghost", "--format", "safetensors", "--out",
                                           "{tmp}/m.safetensors", *_STORE], STORE, "no run 'ghost'"),
    Case("predict with an unknown run", [*_PREDICT[:1], "ghost", *_PREDICT[2:], "--data", "{root}"], STORE,
         "no run 'ghost'"),
    Case("predict with a missing dataset", [*_PREDICT, "--data", "{tmp}/nothing"], DATA, "--data",
         _configured_run()),
    Case("predict on a folder without cubes", [*_PREDICT, "--data", "{tmp}/empty"], DATA, "no cubes",
         _all(_configured_run("{tmp}/runs/ray/checkpoint_000000"), _write("empty/readme.txt", ""))),
    Case("predict with a run that has no checkpoint", [*_PREDICT, "--data", "{root}"], STORE, "no best checkpoint",
         _configured_run()),
    Case("predict a date range without pairs", [*_PREDICT, "--data", "{root}", "--pairs", "20990101:"], CONFIG,
         "--pairs '20990101:': no interferogram", _configured_run("{tmp}/runs/ray/checkpoint_000000")),
    # usage: argparse's mistakes and arguments that do not fit together, in one line with status 2
    Case("no command", [], CONFIG, "the following arguments are required: COMMAND"),
    Case("an unknown option", ["runs", "--bogus"], CONFIG, "unrecognized arguments: --bogus"),
    Case("show a run without its id", ["runs", "show", *_STORE], CONFIG, "runs show: give a run id", _unfinished_run),
    Case("list with a run id", ["runs", "list", "halfway", *_STORE], CONFIG, "runs show halfway", _unfinished_run),
    Case("evaluate an unknown split", ["evaluate", "halfway", "--split", "bogus", *_STORE], CONFIG,
         "argument --split: invalid choice: 'bogus'", _unfinished_run),
    Case("--json beside --format", ["leaderboard", "--json", "--format", "csv", *_STORE], CONFIG,
         "not allowed with argument --json"),
    Case("stop a job without its id", ["jobs", "stop"], CONFIG, "jobs stop: give a submission id"),
    Case("logs of a job without its id", ["jobs", "logs", "--json"], CONFIG, "jobs logs: give a submission id"),
    Case("predict with windows overlapping wholly", [*_PREDICT, "--data", "{root}", "--overlap", "1"], CONFIG,
         "argument --overlap: 1.0: must be in [0, 1)"),
    Case("predict with no model actor", [*_PREDICT, "--data", "{root}", "--actors", "0"], CONFIG,
         "argument --actors: 0: must be at least 1"),
    Case("predict with a threshold above 1", [*_PREDICT, "--data", "{root}", "--threshold", "50"], CONFIG,
         "argument --threshold: 50.0: must be in [0, 1]"),
    Case("bench with no repetition", ["bench", "cube", "--repeats", "0"], CONFIG, "argument --repeats: 0"),
    Case("resume a sweep never run", ["sweep", "{tmp}/sweep.yaml", "--resume", *_TRAIN[1:]], STORE,
         "--resume: no sweep named 'lr-sweep'", _write("sweep.yaml", _SWEEP)),
    Case("sweep id with a slash", ["sweep", "{tmp}/sweep.yaml", "--sweep-id", "a/b", *_TRAIN[1:]], STORE,
         "sweep id 'a/b' is not valid", _write("sweep.yaml", _SWEEP)),
    Case("an unknown benchmark suite", ["bench", "nope", "--store", "{tmp}/b"], CONFIG, "no benchmark suite 'nope'"),
    Case("an unknown benchmark parameter", ["bench", "cube", "--param", "nope=1", "--store", "{tmp}/b"], CONFIG,
         "unknown parameter(s) nope"),
    # cluster configurations
    Case("KubeRay manifest without CRDs", ["cluster", "validate", str(REPO / "cluster/kuberay/raycluster.yaml")],
         MANIFEST, "--crds PATH or THALIA_CRDS"),
    Case("CRD path missing", ["cluster", "validate", str(REPO / "cluster/kuberay/raycluster.yaml"), "--crds",
                              "{tmp}/crds"], MANIFEST, "crds: no such file"),
    Case("KubeRay manifest with a port out of range", ["cluster", "validate", "{tmp}/rc.yaml", "--crds",
                                                       str(REPO.parent / "shared" / "kuberay")], MANIFEST,
         "containerPort: port 99999 is outside 1-65535", _manifest_with("containerPort: 6379", "containerPort: 99999")),
    Case("KubeRay manifest with another Ray's image", ["cluster", "validate", "{tmp}/rc.yaml", "--crds",
                                                       str(REPO.parent / "shared" / "kuberay")], MANIFEST,
         "image: Ray 2.9.0 there, Ray 2.60.0 installed here",
         _manifest_with("rayproject/ray:2.60.0-py311-gpu", "rayproject/ray:2.9.0")),
    Case("launcher config with a typo", ["cluster", "validate", "{tmp}/up.yaml"], MANIFEST, "max_workerz",
         _write("up.yaml", "cluster_name: x\nmax_workerz: 2\nprovider: {type: local, head_ip: h}\n")),
    # job specs
    Case("job spec missing", ["submit", "{tmp}/nope-job.yaml", "--print-ray-command"], JOBSPEC, "nope-job.yaml"),
    Case("job spec with a password in a URL", ["submit", "{tmp}/job.yaml", "--print-ray-command"], JOBSPEC,
         "DATABASE_URL", _write("job.yaml", _SPEC + "runtime_env:\n  env_vars:\n"
                                "    DATABASE_URL: postgres://me:hunter2@db/x\n")),
    Case("job spec with AWS keys under harmless names", ["submit", "{tmp}/job.yaml", "--print-ray-command"], JOBSPEC,
         "runtime_env.env_vars.MISC (an AWS access key id), runtime_env.env_vars.OTHER (an AWS secret access key)",
         _spec_with_env(MISC=AWS_ID, OTHER=AWS_SECRET), hidden=AWS_SECRET),
    Case("job spec with a Hugging Face token", ["submit", "{tmp}/job.yaml", "--print-ray-command"], JOBSPEC,
         "runtime_env.env_vars.MODEL_HUB (a Hugging Face token)", _spec_with_env(MODEL_HUB=HF_TOKEN), hidden=HF_TOKEN),
    Case("job spec with a GitHub token", ["submit", "{tmp}/job.yaml", "--print-ray-command"], JOBSPEC,
         "runtime_env.env_vars.REPO_ACCESS (a GitHub token)", _spec_with_env(REPO_ACCESS=GH_TOKEN), hidden=GH_TOKEN),
    Case("job spec with a secret key in an override", ["submit", "{tmp}/job.yaml", "--print-ray-command", "--set",
                                                       f"runtime.wandb.group={AWS_SECRET}"], JOBSPEC,
         "overrides[0] (an AWS secret access key)", _write("job.yaml", _SPEC), hidden=AWS_SECRET),
]


@pytest.fixture()
def no_ray(monkeypatch):
    monkeypatch.delenv("THALIA_CRDS", raising=False)
    def tripwire(*args, **kwargs):
        raise AssertionError("the CLI started Ray before answering a bad input")
    monkeypatch.setattr(runtime, "start", tripwire)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_before_ray(case: Case, tmp_path, no_ray, capsys, request):
    words = " ".join(case.argv)
    needs_root = "{root}" in words or isinstance(case.setup, RootCopy) or getattr(case.setup, "needs_root", False)
    root = request.getfixturevalue("synthetic_root") if needs_root else None  # generated once, if needed
    if case.setup:
        case.setup(tmp_path, root)
    bucket = request.getfixturevalue("s3_bucket") if "{bucket}" in words else ""
    argv = [a.format(root=root, tmp=tmp_path, bucket=bucket) for a in case.argv]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == case.code, f"{case.name}: exit {code}, expected {case.code}; stderr:\n{err}"
    assert err.startswith("thalia-ray: ") and "Traceback" not in err, err
    assert case.culprit in err, f"{case.name}: {case.culprit!r} not named in {err!r}"
    assert len(err) < 2000, f"{case.name}: {len(err)} characters of error"
    assert not case.hidden or case.hidden not in out + err, f"{case.name}: the secret was printed"
    assert "weights_only" not in err and not (tmp_path / "pwned").exists()  # never advised, never executed


@pytest.mark.parametrize("argv", [["evaluate", "r", "--split", "holdout"], ["prepare", "stats", "--split", "holdout"],
                                  ["export", "--out", "o", "--split", "train", "holdout"]])
def test_an_unknown_split_is_a_usage_error_naming_the_splits(argv, no_ray, capsys):
    assert cli.main(argv) == CONFIG
    err = capsys.readouterr().err
    assert "'holdout'" in err and all(split in err for split in ("train", "val", "test")), err
    assert f"see `thalia-ray {' '.join(argv[:2 if argv[0] == 'prepare' else 1])} --help`" in err


def test_a_shell_sees_one_line_and_the_status(tmp_path):
    bad = tmp_path / "cfg.yaml"
    bad.write_bytes(bytes(range(256)))
    proc = subprocess.run([sys.executable, "-m", "thalia_ray.cli", "config", "show", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == CONFIG and proc.stdout == ""
    assert proc.stderr.strip() == f"thalia-ray: {bad}: not a text file (a YAML configuration is UTF-8 text)"


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigProblem):
        cli.main(["--debug", "config", "show", str(tmp_path)])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigProblem):
        cli.main(["config", "show", str(tmp_path)])


def test_every_kind_has_its_own_status():
    kinds = [ConfigProblem, DataProblem, ShardProblem, ManifestProblem, StorageProblem, StoreProblem, JobSpecProblem]
    assert len({k.exit_code for k in kinds}) == len(kinds) and 1 not in {k.exit_code for k in kinds}



def test_an_error_raised_in_a_ray_task_is_one_line_without_the_task_traceback(monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    from thalia_ray.data.shards.tar import ShardError

    def raises_in_task(args):
        cause = ShardError("shard s-000.tar: keys ['k1'] have no sample.pth")
        raise RayTaskError("_scan_published_shard", "Traceback (most recent call last):\n  File \"x.py\"", cause
                           ).as_instanceof_cause()

    monkeypatch.setattr(cli, "cmd_config_show", raises_in_task)
    assert cli.main(["config", "show"]) == SHARDS
    assert capsys.readouterr().err == "thalia-ray: shard s-000.tar: keys ['k1'] have no sample.pth\n"


def test_a_disk_error_is_one_line_with_the_storage_status(monkeypatch, capsys):
    def disk_full(args):
        raise OSError(28, "No space left on device", "/data/out/shard-000001.tar")

    monkeypatch.setattr(cli, "cmd_config_show", disk_full)
    assert cli.main(["config", "show"]) == STORAGE
    assert capsys.readouterr().err == ("thalia-ray: [Errno 28] No space left on device: "
                                       "'/data/out/shard-000001.tar'\n")
