"""Job specs → the Ray Jobs API: validate locally, submit, follow, list, stop.

A job spec (`jobs/*.yaml`) describes one job on a Ray cluster. Everything in it is checked on the
submitting machine, so a typo fails in a second instead of after a cluster round-trip:

    name: train-cls-single               # required; also the default submission-id prefix
    description: ...                     # optional, free text
    entrypoint: thalia-ray train configs/cls-single.yaml   # a `thalia-ray ...` command line
    config: configs/cls-single.yaml      # the run config the entrypoint passes (must appear in it)
    overrides: [train.epochs=1]          # `section.field=value`, appended as `--set`; validated
    runtime_env:
      working_dir: ..                    # relative to this file (default ..: the repository root),
                                         # or a remote URI (https://.../v0.1.0.zip, s3://...zip)
      pip: [...]                         # extra packages, or `image_uri: <container image>`
      excludes: [...]                    # paths not uploaded (.gitignore is honoured anyway)
      env_vars: {WANDB_MODE: offline}    # non-secret values only
    env_from_cluster: [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, THALIA_STORE]
                                         # NAMES the cluster must provide; never values
    submission_id: train-cls-single      # optional prefix of the submission id

Rules, and why:
- `config` is loaded with `overrides` (then the `--set` values given to `thalia-ray submit`) exactly as
  the job will load it, so a wrong field fails before submission, naming the field. Paths are relative
  to the working directory (for a remote `working_dir`, to the repository holding the spec).
- A secret anywhere in a spec, its overrides or its config is rejected, as `thalia_ray.credentials` finds
  them: a value for a secret-looking name (`AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`, `db_password`), a value
  shaped like a key or token whatever its name (`MISC: AKIA...`), and a URL carrying a credential
  (`DATABASE_URL=postgres://me:pw@db`, a token in a private pip index): specs live in git, and Ray logs a
  job's `runtime_env`. Secrets reach jobs through the cluster's environment (a Kubernetes Secret, an
  instance role), which every Ray process on a node inherits. Each name in `env_from_cluster` is checked
  when the job starts: a missing one fails the job at once, naming it.
- Train and sweep jobs must not write to, or read from, a relative path (`file://data/x` included: a
  `file:` URL without a leading slash is a relative path): it would resolve inside Ray's temporary copy
  of the working directory. When `storage.store` is relative and `THALIA_STORE` is in
  `env_from_cluster`, the job writes to the cluster's `$THALIA_STORE`.
- The submission id is `{prefix}-{UTC time}-{hash of the resolved spec}`: unique per submission. It is
  also the run id of a train job (`--run-id`) and the sweep id of a sweep job (`--sweep-id`), so the
  results are found in the store under it, and a resubmission with the same id resumes.
- Entrypoint tokens may not contain shell metacharacters: the entrypoint runs in a shell on the cluster,
  and `plain_ray_command` must produce the very same command through `ray job submit`, which joins
  its arguments with `subprocess.list2cmdline`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from subprocess import list2cmdline
from typing import Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from thalia_ray import safe_yaml
from thalia_ray.config import ConfigError, ThaliaConfig, load_config
from thalia_ray.credentials import Finding, scan_tree
from thalia_ray.errors import ClusterProblem, JobSpecProblem, excerpt
from thalia_ray.storage import file_url_path
from thalia_ray.store.layout import STORE_ENV, make_run_id
from thalia_ray.tables import Table, render

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PROGRAM = "thalia-ray"
ID_FLAGS = {"train": "--run-id", "pretrain": "--run-id", "sweep": "--sweep-id"}  # the store records these jobs under the submission id
STORE_VERBS = ("train", "pretrain", "sweep")  # verbs that read the dataset and write to the experiment store
LOG_TAIL_LINES = 40
AGENT_NOT_READY = "No available agent to submit job"  # Ray's answer while the job agent starts
AGENT_WAIT_S = 60.0

_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_@%+=:,./\[\]{} -]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*://")


class JobSpecError(JobSpecProblem):
    """A job spec that cannot be submitted; the message names the file and the field."""


class JobError(ClusterProblem):
    """The cluster could not be reached or refused a request."""


# ------------------------------------------------------------------------------- spec schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeEnvSpec(_Strict):
    working_dir: str = ".."
    pip: list[str] | dict[str, Any] | None = None
    image_uri: str | None = None
    excludes: list[str] = []
    env_vars: dict[str, str] = {}

    @field_validator("env_vars")
    @classmethod
    def _names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        return env

    @model_validator(mode="after")
    def _one_installer(self) -> "RuntimeEnvSpec":
        if self.pip is not None and self.image_uri is not None:
            raise ValueError("give pip or image_uri, not both: a container image brings its own packages")
        return self


class SpecFile(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    entrypoint: str = Field(min_length=1)
    config: str | None = None
    overrides: list[str] = []
    runtime_env: RuntimeEnvSpec = Field(default_factory=RuntimeEnvSpec)
    env_from_cluster: list[str] = []
    submission_id: str | None = None  # prefix

    @field_validator("env_from_cluster")
    @classmethod
    def _names_only(cls, names: list[str]) -> list[str]:
        bad = [name for name in names if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"list variable names only (the cluster provides the values), got {bad}")
        return names


# ------------------------------------------------------------------------------- resolved spec
@dataclass(frozen=True)
class JobSpec:
    """A validated spec, ready to submit: the exact entrypoint, runtime_env and id Ray will get."""

    path: Path
    name: str
    submission_id: str
    entrypoint_args: tuple[str, ...]  # joined by list2cmdline, as `ray job submit -- ARGS` does
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    config: ThaliaConfig | None
    run_id: str | None  # the run id in the store (train jobs)
    sweep_id: str | None  # the sweep id in the store (sweep jobs)
    store: str | None  # where results go; "$THALIA_STORE" when the cluster decides

    @property
    def entrypoint(self) -> str:
        return list2cmdline(self.entrypoint_args)


@dataclass(frozen=True)
class JobOutcome:
    submission_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    address: str
    message: str | None = None  # Ray's reason for FAILED / STOPPED
    log_tail: str | None = None  # the last lines of the job's log when it FAILED
    store: str | None = None
    run_id: str | None = None
    sweep_id: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    def summary(self) -> str:
        lines = [f"job {self.submission_id}: {self.status} ({self.address})"]
        if self.store:
            record = f"run {self.run_id}" if self.run_id else f"sweep {self.sweep_id}" if self.sweep_id else ""
            where = f"{record} in {self.store}" if record else self.store
            lines.append(f"results: {where}")
        if self.message:
            lines.append(f"error: {self.message}")
        if self.log_tail:
            lines.append("log tail:\n" + self.log_tail)
        return "\n".join(lines)


@dataclass(frozen=True)
class JobRow:
    submission_id: str
    status: str
    entrypoint: str
    start_time: datetime | None
    end_time: datetime | None
    message: str | None
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------- loading
def _read_spec(path: Path) -> SpecFile:
    try:
        raw = safe_yaml.load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job spec") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobSpecError(f"{path}: cannot read the job spec ({err})") from None
    except safe_yaml.YamlError as err:
        raise JobSpecError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise JobSpecError(f"{path}: a job spec is a mapping (name, entrypoint, ...)")
    _refuse_credentials(path, scan_tree(raw))
    try:
        return SpecFile.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {'.'.join(map(str, e['loc'])) or '(spec)'}: {e['msg']}" for e in err.errors()]
        raise JobSpecError(f"{path}: invalid job spec:\n" + "\n".join(lines)) from None


def _refuse_credentials(path: Path, found: Sequence[Finding]) -> None:
    """Refuse a spec with a secret in it, naming where and what it looks like, never the value."""
    if found:
        raise JobSpecError(
            f"{path}: a secret is given at {', '.join(map(str, found))}. Secrets never go in job specs (they live "
            "in git, and Ray logs a job's runtime_env): list the variable's NAME under env_from_cluster and let "
            "the cluster provide the value (a Kubernetes Secret, an instance role, the head node's environment)."
        )


def _check_tokens(path: Path, what: str, tokens: Sequence[str]) -> None:
    bad = [t for t in tokens if not _SAFE_TOKEN.match(t)]
    if bad:
        raise JobSpecError(
            f"{path}: {what} {bad} contains shell metacharacters ($ ` \\ \" ' ; & | < > ( ) * ? ! # ~): "
            "the entrypoint runs in a shell on the cluster; use plain values"
        )


def _entrypoint_tokens(path: Path, spec: SpecFile) -> list[str]:
    try:
        tokens = shlex.split(spec.entrypoint)
    except ValueError as err:
        raise JobSpecError(f"{path}: entrypoint: {err}") from None
    _check_tokens(path, "entrypoint", tokens)
    if len(tokens) < 2 or tokens[0] != PROGRAM:
        raise JobSpecError(f"{path}: entrypoint must be a `{PROGRAM} COMMAND ...` command line, got {excerpt(spec.entrypoint)}")
    owned = [t for t in tokens if t.split("=", 1)[0] in ("--set", *ID_FLAGS.values())]
    if owned:
        raise JobSpecError(
            f"{path}: entrypoint must not contain {owned}: put overrides under `overrides:` (they are "
            "validated), and the run or sweep id is the submission id"
        )
    if spec.config is not None and spec.config not in tokens:
        raise JobSpecError(f"{path}: entrypoint does not pass config {excerpt(spec.config)}: {excerpt(spec.entrypoint)}")
    return tokens


def _project_dir(path: Path, working_dir: str) -> Path:
    """The local directory the job's relative paths refer to."""
    if _REMOTE.match(working_dir):
        return path.resolve().parent.parent
    return (path.resolve().parent / working_dir).resolve()


def _load_run_config(path: Path, project: Path, config: str, overrides: Sequence[str]) -> ThaliaConfig:
    config_path = project / config
    if not config_path.is_file():
        raise JobSpecError(f"{path}: config {config!r} not found (looked for {config_path})")
    try:
        return load_config(config_path, overrides)
    except ConfigError as err:
        raise JobSpecError(f"{path}: config {config} with overrides {list(overrides)}: {err}") from None


def _is_relative_local(location: str | None) -> bool:
    if location is not None and location.startswith("file:"):
        location = file_url_path(location)
    return location is not None and not _REMOTE.match(location) and not Path(location).is_absolute()


def _job_locations(path: Path, cfg: ThaliaConfig, env_from_cluster: Sequence[str]) -> tuple[str, list[str]]:
    """(where results go, extra entrypoint tokens), refusing paths that only exist in Ray's temp copy."""
    relative = [
        f"data.{key}={value}" for key, value in
        (("root", cfg.data.root), ("shards", cfg.data.shards), ("statistics", cfg.data.statistics))
        if _is_relative_local(value)
    ]
    if relative:
        raise JobSpecError(
            f"{path}: {', '.join(relative)} is a relative path; in a job it would resolve inside Ray's "
            "temporary working directory. Use an absolute path or an s3:// URL (an override in the spec "
            "or `--set`)."
        )
    if not _is_relative_local(cfg.storage.store):
        return cfg.storage.store, []
    if STORE_ENV in env_from_cluster:
        return f"${STORE_ENV}", ["--set", f"storage.store=${{{STORE_ENV}}}"]
    raise JobSpecError(
        f"{path}: storage.store={cfg.storage.store} is a relative path; in a job the results would land in "
        f"Ray's temporary working directory. Set an absolute path or s3:// URL, or list {STORE_ENV} under "
        "env_from_cluster to use the cluster's store."
    )


def _env_guard(names: Sequence[str]) -> list[str]:
    """Shell tokens failing the job at start, naming each variable the cluster did not provide."""
    if not names:
        return []
    checks = [f"${{{n}:?is not set on the cluster (the job spec lists it in env_from_cluster)}}" for n in names]
    return [":", *checks, "&&"]


def _submission_id(prefix: str, fingerprint: dict[str, Any], now: datetime) -> str:
    """A store run id (`{prefix}-{UTC time}-{6 hex}`) whose hex part fingerprints the resolved spec."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    return make_run_id(prefix, now, token=digest[:6])


def _ray_runtime_env(env: RuntimeEnvSpec, project: Path) -> dict[str, Any]:
    working_dir = env.working_dir if _REMOTE.match(env.working_dir) else str(project)
    resolved = {"working_dir": working_dir, "pip": env.pip, "image_uri": env.image_uri,
                "excludes": env.excludes or None, "env_vars": env.env_vars or None}
    return {k: v for k, v in resolved.items() if v is not None}


def load_spec(path: str | Path, overrides: Sequence[str] = (), now: datetime | None = None) -> JobSpec:
    """Read, validate and resolve a job spec; `overrides` (from `--set`) follow the spec's own."""
    path = Path(path)
    spec = _read_spec(path)
    all_overrides = [*spec.overrides, *overrides]
    _refuse_credentials(path, scan_tree(list(all_overrides), "overrides"))
    _check_tokens(path, "overrides", all_overrides)
    tokens = _entrypoint_tokens(path, spec)
    if all_overrides and spec.config is None:
        raise JobSpecError(f"{path}: overrides {all_overrides} given but the spec names no config to apply them to")
    verb = tokens[1]
    project = _project_dir(path, spec.runtime_env.working_dir)
    cfg = _load_run_config(path, project, spec.config, all_overrides) if spec.config else None  # refuses credentials
    store, store_tokens = (None, [])
    if cfg is not None and verb in STORE_VERBS:
        store, store_tokens = _job_locations(path, cfg, spec.env_from_cluster)
    fingerprint = {"spec": spec.model_dump(), "overrides": all_overrides}
    submission_id = _submission_id(spec.submission_id or spec.name, fingerprint, now or datetime.now(timezone.utc))
    id_flag = ID_FLAGS.get(verb)
    run_id = submission_id if ID_FLAGS.get(verb) == "--run-id" else None
    sweep_id = submission_id if verb == "sweep" else None
    args = [
        *_env_guard(spec.env_from_cluster),
        *tokens,
        *[t for o in all_overrides for t in ("--set", o)],
        *store_tokens,
        *([id_flag, submission_id] if id_flag else []),
    ]
    metadata = {"thalia_spec": spec.name, "thalia_config": spec.config or "", "thalia_store": store or "",
                "thalia_run_id": run_id or "", "thalia_sweep_id": sweep_id or ""}
    return JobSpec(path, spec.name, submission_id, tuple(args), _ray_runtime_env(spec.runtime_env, project),
                   metadata, cfg, run_id, sweep_id, store)


# ------------------------------------------------------------------------------- the cluster
def resolve_address(address: str | None = None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise JobError(
            f"cannot reach the Ray job server at {url}: {err}. Start or port-forward the cluster's dashboard "
            "(port 8265), or pass --address / set RAY_ADDRESS."
        ) from None


def _tail_logs(client: Any, submission_id: str, log: Callable[[str], None]) -> None:
    async def stream() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            log(chunk.rstrip("\n"))

    asyncio.run(stream())


def _wait_terminal(client: Any, submission_id: str, poll_s: float = 0.5) -> str:
    """The log stream ends with the job; its status may take a moment longer to turn terminal."""
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


def _log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _outcome(client: Any, spec: JobSpec, status: str) -> JobOutcome:
    failed = status in ("FAILED", "STOPPED")
    info = client.get_job_info(spec.submission_id) if failed else None
    tail = _log_tail(client.get_job_logs(spec.submission_id)) if status == "FAILED" else None
    return JobOutcome(spec.submission_id, status, client.get_address(), info.message if info else None,
                      tail, spec.store, spec.run_id, spec.sweep_id)


def _submit_when_ready(client: Any, spec: JobSpec, wait_s: float = AGENT_WAIT_S) -> None:
    """Submit, retrying while the head's job agent is still starting (a cluster that just came up)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                              submission_id=spec.submission_id, metadata=spec.metadata)
            return
        except RuntimeError as err:
            if AGENT_NOT_READY not in str(err) or time.monotonic() > deadline:
                raise JobError(f"{client.get_address()} refused job {spec.submission_id} ({spec.path}): {err}") from None
            time.sleep(1.0)


def submit(spec: JobSpec, address: str | None = None, follow: bool = False,
           log: Callable[[str], None] = print) -> JobOutcome:
    """Submit `spec`; with `follow`, stream its log and wait for the final status."""
    client = _client(address)
    _submit_when_ready(client, spec)
    log(f"submitted {spec.submission_id} to {client.get_address()}")
    if not follow:
        return _outcome(client, spec, str(client.get_job_status(spec.submission_id).value))
    try:
        _tail_logs(client, spec.submission_id, log)
        status = _wait_terminal(client, spec.submission_id)
    except KeyboardInterrupt:
        log(f"stopped following; the job keeps running (thalia-ray jobs stop {spec.submission_id})")
        raise
    return _outcome(client, spec, status)


def list_jobs(address: str | None = None) -> list[JobRow]:
    """Jobs submitted through the Jobs API (not plain drivers), oldest first."""
    rows = [
        JobRow(
            submission_id=job.submission_id,
            status=str(job.status.value),
            entrypoint=job.entrypoint,
            start_time=_from_ms(job.start_time),
            end_time=_from_ms(job.end_time),
            message=job.message,
            metadata=dict(job.metadata or {}),
        )
        for job in _client(address).list_jobs()
        if job.submission_id
    ]
    return sorted(rows, key=lambda r: r.start_time or datetime.min.replace(tzinfo=timezone.utc))


def _from_ms(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc) if ms else None


def format_jobs(rows: Sequence[JobRow]) -> str:
    """The table of `thalia-ray jobs list`: each submission and where its results go."""
    if not rows:
        return "no jobs"
    table = []
    for r in rows:
        store, run, sweep = (r.metadata.get(f"thalia_{k}", "") for k in ("store", "run_id", "sweep_id"))
        where = f"{store} (run {run})" if run else f"{store} (sweep {sweep})" if sweep else store
        table.append([r.submission_id, r.status, f"{r.start_time:%Y-%m-%d %H:%M:%S}" if r.start_time else None,
                      where or None])
    return render(Table(["submission id", "status", "started (UTC)", "results"], table), "terminal")


def stop_job(address: str | None, submission_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already finished."""
    client = _client(address)
    try:
        return bool(client.stop_job(submission_id))
    except RuntimeError as err:
        raise JobError(f"cannot stop job {submission_id} at {client.get_address()}: {err}") from None


def job_logs(address: str | None, submission_id: str) -> str:
    client = _client(address)
    try:
        return client.get_job_logs(submission_id)
    except RuntimeError as err:
        raise JobError(f"no logs for job {submission_id} at {client.get_address()}: {err}") from None


def plain_ray_command(spec: JobSpec, address: str | None = None) -> str:
    """The same submission with Ray's own CLI, for clusters without thalia-ray on the client.

    `ray job submit` joins the arguments after `--` with `list2cmdline`, giving back `spec.entrypoint`.
    """
    env = {k: v for k, v in spec.runtime_env.items() if k != "working_dir"}
    args = ["ray", "job", "submit", *(["--address", address] if address else []),
            "--submission-id", spec.submission_id, "--working-dir", spec.runtime_env["working_dir"]]
    if env:
        args += ["--runtime-env-json", json.dumps(env, sort_keys=True)]
    args += ["--metadata-json", json.dumps(spec.metadata, sort_keys=True), "--", *spec.entrypoint_args]
    return shlex.join(args)
