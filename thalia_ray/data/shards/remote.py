"""Ray options for the tasks that read or write shards and cubes."""
from __future__ import annotations

import os
from typing import Any


_FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def remote_args(num_cpus: float, *urls: str | None) -> dict[str, Any]:
    """Ray options for tasks that read or write `urls`. Workers inherit the environment of the
    process that started Ray, which may predate the S3 settings of this driver: when a location is
    on S3, the driver's standard AWS variables are forwarded in the task's runtime_env."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if any(str(u).startswith(("s3://", "s3a://")) for u in urls if u):
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
    return options
