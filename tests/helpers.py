"""Helpers shared by tests: the CLI in a fresh interpreter, with its own environment."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

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


def tiny_train_config(path: Path, data_root: Path, store: Path, **train: Any) -> Path:
    """A one-worker CPU run of a few steps on `data_root`, written as YAML to `path`."""
    cfg = {
        "name": "tiny",
        "data": {"root": str(data_root), "crop": 32, "samples_per_read_task": 32},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 1, "cpus_per_worker": 1, "max_steps_per_epoch": 1,
                  "max_failures": 0, "test_best": False, **train},
        "storage": {"store": str(store)},
        "runtime": {"num_cpus": 2, "object_store_memory": 100_000_000, "wandb": {"mode": "disabled"}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
