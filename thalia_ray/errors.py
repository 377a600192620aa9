"""The error family for everything a user can fix; the CLI prints these as one line.

Each kind has its own exit status, so a script or a job retry policy can tell a bad configuration
from missing data or an unreachable store without parsing messages. Concrete errors (e.g.
`ConfigError` and `StoreError` here, `data.shards.ShardError`) subclass the kind they belong to.

| status | kind |
| --- | --- |
| 1 | any other user-fixable error |
| 2 | configuration and usage: YAML files, `--set` overrides, field values, command-line arguments |
| 3 | dataset: root, annotations, time-series index, cubes |
| 4 | shards: missing export, manifest, channels, damaged members |
| 5 | cluster manifests and CRD schemas |
| 6 | storage: unreachable endpoint, missing bucket, denied access |
| 7 | experiment store: run and sweep records |
| 8 | job specs |
| 9 | Ray cluster / Jobs API unreachable or refusing |
| 130, 143 | interrupted by SIGINT or SIGTERM (128 + the signal's number; `interrupts.Interrupted`) |
"""
from __future__ import annotations


class ThaliaError(Exception):
    """An error whose message names what is wrong and where; `exit_code` is the CLI's status for it."""

    exit_code = 1


class ConfigProblem(ThaliaError, ValueError):
    """A YAML file, a `--set` override or a field value that cannot be used."""

    exit_code = 2


class ConfigError(ConfigProblem):
    """A configuration that cannot be used; the message names every offending field."""


class UsageError(ConfigProblem):
    """Command-line arguments that do not fit the command: an unknown option or choice, a missing id."""


class DataProblem(ThaliaError, ValueError):
    """A dataset root, its annotations or time-series index, or a cube that is missing or unreadable."""

    exit_code = 3


class ShardProblem(ThaliaError, ValueError):
    """An export that is missing, damaged, or does not match the configuration."""

    exit_code = 4


class ManifestProblem(ThaliaError, ValueError):
    """A cluster manifest, cluster-launcher config or CRD schema that cannot be used."""

    exit_code = 5


class StorageProblem(ThaliaError, RuntimeError):
    """A location that cannot be reached: endpoint down or silent, bucket missing, access denied."""

    exit_code = 6


class StoreProblem(ThaliaError, RuntimeError):
    """An experiment-store record that is missing or malformed, or a store that cannot be written."""

    exit_code = 7


class StoreError(StoreProblem):
    """A run or sweep record is missing, malformed, or asked to do something it cannot."""


class JobSpecProblem(ThaliaError, ValueError):
    """A job spec that cannot be submitted (e.g. it holds a secret or a relative path)."""

    exit_code = 8


class ClusterProblem(ThaliaError, RuntimeError):
    """A Ray cluster or Jobs API that cannot be reached or refuses a request."""

    exit_code = 9


EXCERPT_CHARS = 80  # the most of a bad value an error message quotes


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A bad value as an error message may quote it: its repr, credentials masked, at most about `limit`
    characters (then its length). Nested values are shown a few levels and items deep, so quoting a huge or
    self-referencing structure stays fast."""
    import reprlib

    from thalia_ray.credentials import redact

    shown = reprlib.Repr()
    shown.maxlevel = 3
    shown.maxdict = shown.maxlist = shown.maxtuple = shown.maxset = shown.maxfrozenset = shown.maxdeque = 4
    shown.maxlong = shown.maxstring = shown.maxother = limit
    text = redact(shown.repr(value))
    if len(text) > limit:
        text = text[:limit] + "…"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        text += f" ({len(value):,} characters)"
    return text
