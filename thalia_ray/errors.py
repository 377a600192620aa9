"""The error family for everything a user can fix; the CLI prints these as one line.

Each kind has its own exit status, so a script or a job retry policy can tell a bad configuration
from missing data or an unreachable store without parsing messages. Concrete errors (e.g.
`config.ConfigError`, `data.shards.ShardError`) subclass the kind they belong to.

| status | kind |
| --- | --- |
| 1 | any other user-fixable error |
| 2 | configuration: YAML files, `--set` overrides, field values |
| 3 | dataset: root, annotations, time-series index, cubes |
| 4 | shards: missing export, manifest, channels, damaged members |
| 5 | cluster manifests and CRD schemas |
| 6 | storage: unreachable endpoint, missing bucket, denied access |
| 7 | experiment store: run and sweep records |
| 8 | job specs |
| 9 | Ray cluster / Jobs API unreachable or refusing |
"""
from __future__ import annotations


class ThaliaError(Exception):
    """An error whose message names what is wrong and where; `exit_code` is the CLI's status for it."""

    exit_code = 1


class ConfigProblem(ThaliaError, ValueError):
    exit_code = 2


class DataProblem(ThaliaError, ValueError):
    exit_code = 3


class ShardProblem(ThaliaError, ValueError):
    exit_code = 4


class ManifestProblem(ThaliaError, ValueError):
    exit_code = 5


class StorageProblem(ThaliaError, RuntimeError):
    exit_code = 6


class StoreProblem(ThaliaError, RuntimeError):
    exit_code = 7


class JobSpecProblem(ThaliaError, ValueError):
    exit_code = 8


class ClusterProblem(ThaliaError, RuntimeError):
    exit_code = 9
