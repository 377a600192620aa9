"""Id rules: what a run or sweep id may look like, and how a config refers to a stored run.

Part of the bottom layer (docs/architecture.md): `config` checks `model.pretrained: run:<RUN_ID>` with
these rules and the store names its folders with them, so they sit below both. Ids are safe as folder
names, Ray run names and object keys: letters, digits, `-` and `_`.
"""
from __future__ import annotations

import re

from thalia_ray.errors import StoreError, excerpt

ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ID_LIMIT = 128  # characters of a run id: a folder and object-key name on every store, with room to spare
SWEEP_ID_LIMIT = ID_LIMIT - 28  # a trial's run id is `{sweep id}-{Tune's trial id}`
RUN_PREFIX = "run:"  # `model.pretrained: run:<RUN_ID>` starts from that stored run's best checkpoint


def check_id(value: str, what: str = "run id") -> str:
    """Refuse ids that could escape the store or break Ray names (`..`, `/`, dots, spaces), or that are too
    long for a folder name once Ray adds its own parts (sweep ids leave room for the trial suffix)."""
    if not isinstance(value, str) or not ID.match(value):
        raise StoreError(f"{what} {excerpt(value)} is not valid: use letters, digits, '-' and '_' only")
    limit = SWEEP_ID_LIMIT if what == "sweep id" else ID_LIMIT
    if len(value) > limit:
        raise StoreError(f"{what} {excerpt(value, 24)} is too long: at most {limit} characters")
    return value


def run_reference(pretrained: str | None) -> str | None:
    """The run id of `run:<RUN_ID>`, else None."""
    if pretrained is None or not pretrained.startswith(RUN_PREFIX):
        return None
    return pretrained[len(RUN_PREFIX):]
