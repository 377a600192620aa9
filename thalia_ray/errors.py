"""The base of every error a user can fix from its message; the CLI prints these as one line."""
from __future__ import annotations


class ThaliaError(Exception):
    """An error whose message names what is wrong and where; `exit_code` is the CLI's status for it."""

    exit_code = 1
