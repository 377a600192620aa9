"""Job specs and the Ray Jobs API client: validation before submission, then real jobs on a real head.

The integration tests start their own `ray start --head` (own ports, own temp dir, own session) and
end it by killing that session's processes only: `ray stop` would also kill the test session's
in-process Ray and any other Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from subprocess import list2cmdline
from typing import Any, Iterator

import pytest
import yaml

from thalia_ray import credentials, jobs
from thalia_ray.bench.s3server import free_port
from thalia_ray.config import load_config
from thalia_ray.errors import ClusterProblem
from thalia_ray.models.registry import get_spec

from tests.helpers import kill_session

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, where `thalia-ray` lives
SPECS = sorted((REPO / "jobs").glob("*.yaml"))
EXPECTED_SPECS = {"train-cls-single", "train-cls-series", "train-seg-single", "train-seg-series",
                  "sweep-backbones", "export-shards", "stats",
                  "paper-cls-single", "paper-cls-series", "paper-cls-series-vit", "paper-cls-series-cubes",
                  "paper-seg-single", "paper-seg-series", "predict", "pretrain-mae", "finetune-sweep"}
NOW = datetime(2025, 3, 1, 14, 22, 10, tzinfo=timezone.utc)


def _write_spec(tmp_path: Path, **fields: Any) -> Path:
    """A train spec (cls-single) outside the repo whose working_dir is the repo; fields replace keys."""
    spec = {
        "name": "probe",
        "entrypoint": "thalia-ray train configs/cls-single.yaml",
        "config": "configs/cls-single.yaml",
        "overrides": ["data.root=/data/thalia"],
        "runtime_env": {"working_dir": str(REPO), "env_vars": {"WANDB_MODE": "offline"}},
        "env_from_cluster": ["THALIA_STORE"],
    }
    spec.update(fields)
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the shipped specs
def test_every_spec_is_shipped() -> None:
    assert {yaml.safe_load(p.read_text())["name"] for p in SPECS} == EXPECTED_SPECS


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_parses_and_its_config_validates(path: Path) -> None:
    spec = jobs.load_spec(path, now=NOW)
    raw = yaml.safe_load(path.read_text())
    assert spec.name == raw["name"]
    assert spec.submission_id.startswith(f"{raw['submission_id']}-20250301-142210-")
    assert spec.runtime_env["working_dir"] == str(REPO)
    assert "thalia-ray" in spec.entrypoint_args
    if raw.get("config"):
        assert spec.config is not None and spec.config == load_config(REPO / raw["config"], raw.get("overrides", []))
    verb = spec.entrypoint_args[spec.entrypoint_args.index("thalia-ray") + 1]
    id_flag = {"train": "--run-id", "pretrain": "--run-id", "sweep": "--sweep-id"}.get(verb)
    assert (spec.run_id, spec.sweep_id) == (
        spec.submission_id if id_flag == "--run-id" else None, spec.submission_id if verb == "sweep" else None)
    if id_flag:
        assert spec.entrypoint.endswith(f"{id_flag} {spec.submission_id}")
        assert spec.store == "$THALIA_STORE" and "storage.store=${THALIA_STORE}" in spec.entrypoint
    else:
        assert not {"--run-id", "--sweep-id"} & set(spec.entrypoint_args) and spec.store is None


def test_paper_jobs_train_on_the_published_shards_and_one_on_cubes() -> None:
    """The paper jobs run their preset on the published shards, with the reference's statistics file
    named; one runs it on the Zarr minicubes instead."""
    sources = {}
    for path in sorted((REPO / "jobs").glob("paper-*.yaml")):
        spec = jobs.load_spec(path, now=NOW)
        data = spec.config.data
        assert data.statistics is not None and data.statistics.endswith("statistics.json")
        assert "Orion-AI-Lab/Thalia" in path.read_text()  # where the statistics file comes from
        sources[path.stem] = data.source
    assert sources.pop("paper-cls-series-cubes") == "cube"
    assert set(sources.values()) == {"published"} and len(sources) == 5


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_plain_ray_command_gives_the_same_entrypoint(path: Path) -> None:
    spec = jobs.load_spec(path, now=NOW)
    words = shlex.split(jobs.plain_ray_command(spec, address="http://head:8265"))
    split = words.index("--")
    options = dict(zip(words[3:split:2], words[4:split:2]))
    assert words[:3] == ["ray", "job", "submit"]
    assert options["--address"] == "http://head:8265"
    assert options["--submission-id"] == spec.submission_id
    assert options["--working-dir"] == spec.runtime_env["working_dir"]
    # `ray job submit` joins the words after `--` with list2cmdline: the very string submit() sends.
    assert list2cmdline(words[split + 1:]) == spec.entrypoint


def test_example_configs_cover_the_benchmark_tasks() -> None:
    single, series = load_config(REPO / "configs/seg-single.yaml"), load_config(REPO / "configs/seg-series.yaml")
    assert (single.model.task, single.data.length, series.data.length, series.data.mask_target) == (
        "segmentation", 1, 3, "union")
    assert load_config(REPO / "configs/cls-series.yaml").data.length == 3
    sweep = load_config(REPO / "configs/sweep-backbones.yaml").sweep
    assert sweep is not None and sweep.scheduler == "asha"
    families = {get_spec(name).family for name in sweep.space["model.name"].examples()}
    assert len(families) >= 2 and len(sweep.space["train.lr"].examples()) >= 2


# ----------------------------------------------------------------------------- validation
def test_bad_config_field_fails_before_submission_naming_it(tmp_path: Path) -> None:
    with pytest.raises(jobs.JobSpecError, match=r"train\.lrr: unknown field"):
        jobs.load_spec(_write_spec(tmp_path, overrides=["data.root=/d", "train.lrr=1e-4"]))
    with pytest.raises(jobs.JobSpecError, match=r"model\.name"):
        jobs.load_spec(REPO / "jobs/train-cls-single.yaml", overrides=["model.name=resnet-9000"])


def test_cli_overrides_follow_the_spec_and_change_the_id(tmp_path: Path) -> None:
    path = _write_spec(tmp_path)
    base = jobs.load_spec(path, now=NOW)
    tuned = jobs.load_spec(path, overrides=["train.lr=3e-5"], now=NOW)
    assert tuned.config is not None and tuned.config.train.lr == 3e-5
    assert tuned.entrypoint_args[-6:-4] == ("--set", "train.lr=3e-5")
    assert jobs.load_spec(path, now=NOW).submission_id == base.submission_id  # stable
    assert tuned.submission_id != base.submission_id  # unique per resolved spec
    assert jobs.load_spec(path, now=NOW.replace(second=11)).submission_id != base.submission_id


@pytest.mark.parametrize("where", [
    {"runtime_env": {"working_dir": str(REPO), "env_vars": {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}}},
    {"runtime_env": {"working_dir": str(REPO), "env_vars": {"WANDB_API_KEY": "wJalrXUtnFEMI"}}},
    {"env_from_cluster": {"THALIA_STORE": "s3://b", "HF_TOKEN": "wJalrXUtnFEMI"}},
    {"overrides": ["data.root=/d", "storage.password=wJalrXUtnFEMI"]},
], ids=["aws-secret", "wandb-key", "env-from-cluster-values", "override"])
def test_a_secret_value_is_rejected_without_echoing_it(tmp_path: Path, where: dict[str, Any]) -> None:
    with pytest.raises(jobs.JobSpecError, match="secret") as err:
        jobs.load_spec(_write_spec(tmp_path, **where))
    assert "wJalrXUtnFEMI" not in str(err.value)
    assert any(name in str(err.value) for name in ("AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "HF_TOKEN", "password"))


CANARY = "hunter2canary"


@pytest.mark.parametrize("where,culprit", [
    ({"runtime_env": {"working_dir": str(REPO), "env_vars": {"DB_PASS": CANARY}}}, "DB_PASS"),
    ({"runtime_env": {"working_dir": str(REPO), "env_vars": {"GH_PAT": CANARY}}}, "GH_PAT"),
    ({"runtime_env": {"working_dir": str(REPO), "env_vars": {"DATABASE_URL": f"postgres://me:{CANARY}@db/x"}}},
     "DATABASE_URL"),
    ({"runtime_env": {"working_dir": str(REPO), "pip": [f"--index-url https://__token__:{CANARY}@pkgs.example/simple",
                                                        "timm"]}}, "pip[0]"),
    ({"runtime_env": {"working_dir": str(REPO), "pip": [f"https://ghp_{CANARY}{CANARY}@github.com/o/r.whl"]}},
     "pip[0]"),
    ({"runtime_env": {"working_dir": str(REPO), "env_vars": {"INDEX": f"https://h/simple?token={CANARY}"}}}, "INDEX"),
    ({"overrides": ["data.root=/d", f"storage.endpoint_url=http://admin:{CANARY}@minio:9000"]}, "overrides[1]"),
], ids=["pass", "pat", "database-url", "pip-index-userinfo", "token-as-user", "token-query", "endpoint-userinfo"])
def test_credentials_in_names_and_urls_are_refused_without_echoing_them(
        tmp_path: Path, where: dict[str, Any], culprit: str) -> None:
    with pytest.raises(jobs.JobSpecError) as err:
        jobs.load_spec(_write_spec(tmp_path, **where))
    assert CANARY not in str(err.value) and culprit in str(err.value), str(err.value)


def test_a_credential_in_the_config_files_endpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(f"storage: {{endpoint_url: 'http://admin:{CANARY}@minio:9000'}}\n")
    spec = _write_spec(tmp_path, entrypoint=f"thalia-ray train {tmp_path}/cfg.yaml", config=f"{tmp_path}/cfg.yaml")
    with pytest.raises(jobs.JobSpecError, match="storage.endpoint_url") as err:
        jobs.load_spec(spec)
    assert CANARY not in str(err.value)


@pytest.mark.parametrize("url", ["s3://bucket/x", "https://pypi.org/simple", "git+https://git@github.com/o/r",
                                 "http://minio:9000", "file:///abs/data"])
def test_urls_without_credentials_pass(url: str) -> None:
    assert not credentials.url_credential(url) and not credentials.shapes(url)


@pytest.mark.parametrize("override,shown", [
    ("data.root=file://data/thalia", "data.root=file://data/thalia is a relative path"),
    ("data.shards=file://shards", "data.shards=file://shards is a relative path"),
], ids=["file-data", "file-shards"])
def test_relative_file_urls_are_relative_paths(tmp_path: Path, override: str, shown: str) -> None:
    with pytest.raises(jobs.JobSpecError, match=shown):
        jobs.load_spec(_write_spec(tmp_path, overrides=["data.root=/d", override]))


def test_a_relative_file_url_store_needs_the_clusters_store(tmp_path: Path) -> None:
    with pytest.raises(jobs.JobSpecError, match="storage.store=file://runs is a relative path"):
        jobs.load_spec(_write_spec(tmp_path, env_from_cluster=[], overrides=["data.root=/d", "storage.store=file://runs"]))
    spec = jobs.load_spec(_write_spec(tmp_path, overrides=["data.root=/d", "storage.store=file://runs"]))
    assert spec.store == "$THALIA_STORE"


def test_secret_names_may_be_required_from_the_cluster(tmp_path: Path) -> None:
    spec = jobs.load_spec(_write_spec(tmp_path, env_from_cluster=["THALIA_STORE", "AWS_SECRET_ACCESS_KEY"]))
    assert "${AWS_SECRET_ACCESS_KEY:?is not set on the cluster" in spec.entrypoint
    assert not credentials.secret_name("THALIA_STORE") and credentials.secret_name("aws_access_key_id")


@pytest.mark.parametrize("fields,message", [
    ({"env_from_cluster": []}, r"storage\.store=\./runs is a relative path"),
    ({"overrides": ["data.root=./data/thalia-synthetic"]}, r"data\.root=\./data/thalia-synthetic is a relative path"),
    ({"overrides": ["data.root=/d", "data.frames=[a;b]"]}, "shell metacharacters"),
    ({"entrypoint": "thalia-ray train configs/cls-single.yaml && rm -rf /"}, "shell metacharacters"),
    ({"entrypoint": "python -m thalia_ray train configs/cls-single.yaml"}, "thalia-ray COMMAND"),
    ({"entrypoint": "thalia-ray train configs/cls-series.yaml"}, "does not pass config"),
    ({"entrypoint": "thalia-ray train configs/cls-single.yaml --set train.lr=1"}, "put overrides under"),
    ({"config": "configs/nope.yaml", "entrypoint": "thalia-ray train configs/nope.yaml"}, "not found"),
    ({"runtime_env": {"working_dir": str(REPO), "pip": ["x"], "image_uri": "img"}}, "pip or image_uri"),
    ({"entrypoint_cpus": 1}, r"entrypoint_cpus: Extra inputs"),
], ids=["relative-store", "relative-data", "override-metachar", "entrypoint-metachar", "not-thalia-ray",
        "config-mismatch", "set-in-entrypoint", "missing-config", "pip-and-image", "unknown-key"])
def test_unusable_specs_are_refused_with_the_reason(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(jobs.JobSpecError, match=message):
        jobs.load_spec(_write_spec(tmp_path, **fields))


def test_an_absolute_store_is_used_as_given(tmp_path: Path) -> None:
    spec = jobs.load_spec(_write_spec(tmp_path, env_from_cluster=[], overrides=["data.root=/d", "storage.store=s3://b/runs"]))
    assert spec.store == "s3://b/runs" and spec.metadata["thalia_store"] == "s3://b/runs"
    assert not any("$" in word for word in spec.entrypoint_args)


def test_unreachable_cluster_is_named(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(jobs.JobError, match=f"127.0.0.1:{port}"):
        jobs.list_jobs(f"http://127.0.0.1:{port}")


# ----------------------------------------------------------------------------- a real head
@dataclass(frozen=True)
class Head:
    url: str
    store: Path  # the cluster's $THALIA_STORE


def _wait_for_job_server(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    """Until a probe job has run: the dashboard answers before the head's job agent accepts jobs."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout_s
    probe = None
    while True:
        try:
            client = JobSubmissionClient(url)
            probe = probe or client.submit_job(entrypoint="true", submission_id=f"probe-{time.time_ns()}")
            if client.get_job_status(probe).is_terminal():
                return
        except Exception:  # noqa: BLE001 - not up yet; the deadline decides
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the Ray head did not come up at {url}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths are length-limited
    store = tmp_path_factory.mktemp("cluster-store")
    log = Path(temp_dir) / "head.log"
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "THALIA_STORE": str(store),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
             # Ports whose defaults another Ray on this machine may hold (the job agent, Ray Client).
             "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--disable-usage-stats", "--temp-dir", temp_dir, "--include-dashboard", "true"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_server(url, proc, log)
        yield Head(url, store)
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _follow(spec: jobs.JobSpec, head: Head) -> tuple[jobs.JobOutcome, list[str]]:
    lines: list[str] = []
    return jobs.submit(spec, address=head.url, follow=True, log=lines.append), lines


@pytest.mark.slow
def test_a_failing_job_reports_failed_with_the_error(ray_head: Head, tmp_path: Path) -> None:
    path = _write_spec(tmp_path, name="needs-var", env_from_cluster=["THALIA_STORE", "THALIA_TEST_NOT_ON_CLUSTER"])
    spec = jobs.load_spec(path)
    outcome, lines = _follow(spec, ray_head)
    assert outcome.status == "FAILED" and not outcome.succeeded
    assert outcome.message and "THALIA_TEST_NOT_ON_CLUSTER: is not set on the cluster" in outcome.message
    assert outcome.log_tail and "THALIA_TEST_NOT_ON_CLUSTER" in outcome.log_tail
    assert any("THALIA_TEST_NOT_ON_CLUSTER" in line for line in lines)  # streamed while following
    assert "THALIA_TEST_NOT_ON_CLUSTER" in jobs.job_logs(ray_head.url, spec.submission_id)
    with pytest.raises(jobs.JobError, match="refused"):  # the id is taken: no double submission
        jobs.submit(spec, address=ray_head.url)


@pytest.mark.slow
def test_stop_and_list_jobs(ray_head: Head, capsys: pytest.CaptureFixture[str]) -> None:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.url)
    job_id = client.submit_job(entrypoint="sleep 300", submission_id=f"sleeper-{time.time_ns()}")
    deadline = time.time() + 60
    while str(client.get_job_status(job_id).value) != "RUNNING" and time.time() < deadline:
        time.sleep(0.3)
    assert jobs.stop_job(ray_head.url, job_id) is True
    while not client.get_job_status(job_id).is_terminal() and time.time() < deadline:
        time.sleep(0.3)
    rows = {row.submission_id: row for row in jobs.list_jobs(ray_head.url)}
    assert rows[job_id].status == "STOPPED" and rows[job_id].entrypoint == "sleep 300"
    assert job_id in jobs.format_jobs(list(rows.values()))
    with pytest.raises(jobs.JobError, match="no-such-job"):
        jobs.stop_job(ray_head.url, "no-such-job")
    from thalia_ray.cli import main

    assert main(["jobs", "list", "--address", ray_head.url, "--json"]) == 0
    listed = {row["submission_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert listed[job_id]["status"] == "STOPPED" and listed[job_id]["end_time"] >= listed[job_id]["start_time"]
    assert datetime.fromisoformat(listed[job_id]["start_time"]).tzinfo is not None  # ISO 8601, in UTC
    assert main(["jobs", "stop", "no-such-job", "--address", ray_head.url]) == ClusterProblem.exit_code
    assert "no-such-job" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_data_fails_the_job_naming_the_location(ray_head: Head, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    spec = jobs.load_spec(REPO / "jobs/train-cls-single.yaml", overrides=[f"data.root={missing}"])
    outcome, _ = _follow(spec, ray_head)
    assert outcome.status == "FAILED"
    # The path is in the echoed command line too: look for it in the error lines only.
    errors = [line for line in f"{outcome.message}\n{outcome.log_tail}".splitlines() if "Running entrypoint" not in line]
    assert any(str(missing) in line for line in errors), outcome.summary()


@pytest.mark.slow
def test_train_job_succeeds_and_its_results_are_in_the_store(ray_head: Head, synthetic_root: Any) -> None:
    from thalia_ray.store import ExperimentStore

    spec = jobs.load_spec(REPO / "jobs/train-cls-single.yaml", overrides=[
        f"data.root={synthetic_root}", "data.crop=32", "train.epochs=1", "train.max_steps_per_epoch=2",
        "train.batch_size=4", "train.num_workers=1", "train.test_best=false", "runtime.data_cpu_limit=0.5",
        "runtime.wandb.mode=disabled",
    ])
    outcome, lines = _follow(spec, ray_head)
    assert outcome.status == "SUCCEEDED", outcome.summary()
    assert (outcome.run_id, outcome.store) == (spec.submission_id, "$THALIA_STORE")
    assert any(spec.submission_id in line for line in lines)
    run = ExperimentStore(str(ray_head.store)).run(outcome.run_id)
    assert run.read_status()["status"] == "finished"
    results = run.read_results()
    assert results is not None and results["metrics"]
    row = next(r for r in jobs.list_jobs(ray_head.url) if r.submission_id == spec.submission_id)
    assert row.status == "SUCCEEDED" and row.metadata["thalia_run_id"] == spec.submission_id


def test_job_list_names_where_each_jobs_results_go() -> None:
    rows = [jobs.JobRow("thalia-train-abc", "RUNNING", "thalia-ray train x.yaml",
                        datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc), None, None,
                        {"thalia_store": "s3://b/runs", "thalia_run_id": "r1"}),
            jobs.JobRow("sleeper", "STOPPED", "sleep 300", None, None, None, {})]
    lines = jobs.format_jobs(rows).splitlines()
    assert lines[0].split() == ["submission", "id", "status", "started", "(UTC)", "results"]
    assert lines[2].split() == ["thalia-train-abc", "RUNNING", "2025-01-02", "03:04:05", "s3://b/runs", "(run", "r1)"]
    assert lines[3].split() == ["sleeper", "STOPPED", "—", "—"]
    assert jobs.format_jobs([]) == "no jobs"
