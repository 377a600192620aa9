"""The one credential detector: by name (`AWS_SECRET_ACCESS_KEY`, `HF_TOKEN`) and by shape (`AKIA...`).

Job specs and cluster manifests live in git, and Ray writes a job's `runtime_env` to its world-readable
session logs, so a credential must never travel in either, whatever name it is given: a value under a
harmless name (`MISC: AKIA...`) is as much a leak as one under `AWS_SECRET_ACCESS_KEY`. Every path that
takes values from a user and passes them on or prints them asks this module: `jobs` (specs, overrides,
the printed `ray job submit` command), `manifests` (KubeRay and cluster-launcher files), `runtime`
(what is forwarded to Ray's workers) and the CLI's error line (`redact`).

Shapes recognised (documented formats of each provider):

| what | shape |
| --- | --- |
| AWS access key id | `AKIA`/`ASIA`/... + 16 upper-case letters or digits |
| AWS secret access key | 40 characters of base64 (`A-Z a-z 0-9 / +`) with upper, lower case and digits |
| GitHub token | `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` + 36 or more; `github_pat_...` |
| Hugging Face token | `hf_` + 30 or more letters and digits |
| W&B API key | 40 lower-case hex digits (a value under a name saying SHA, COMMIT, HASH... is a digest) |
| private key | a PEM `-----BEGIN ... PRIVATE KEY-----` block |
| credential in a URL | a password or a long token in the user info, or a token query parameter |

A finding names where the value is and what it looks like, never the value itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

# A name is secret-looking when one of its parts (split at anything but letters and digits) is one of
# these, or ends with KEY, TOKEN, SECRET or PASSWORD: AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, db_password.
SECRET_PARTS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASS", "PWD", "PAT", "CREDENTIAL", "CREDENTIALS")
_SECRET_SUFFIXES = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# Names whose 40-hex values are digests (a git commit, a checksum), not W&B keys.
_DIGEST_PARTS = ("SHA", "SHA1", "SHA256", "COMMIT", "REV", "REVISION", "HASH", "DIGEST", "CHECKSUM", "ETAG")

_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)"
                                     r"[A-Z0-9]{16}(?![A-Z0-9])")),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})")),
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}")),
    ("a private key", re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")),
)
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+_-])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=_-])")
_HEX40 = re.compile(r"(?<![A-Za-z0-9_/+.@:=-])(?:local-)?[0-9a-f]{40}(?![A-Za-z0-9_/+.-])")
# Query parameters that carry a credential (presigned URLs, token-in-URL package indexes).
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|access_token|auth|password|passwd|pwd|key|api_key|sig|signature|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s#]+")
_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", re.IGNORECASE)
TOKEN_USER_MIN = 16  # a URL user name this long is a token (`https://ghp_...@github.com`), not a login
# `name: value` or `name=value` in free text (shell lines, Markdown), value a literal: not `$VAR`, `${...}`
# or `{{...}}`, not empty.
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)[\"']?\s*[:=]\s*[\"']?(?P<value>[^\s\"'$#{][^\s\"']*)")
_COMMENT = re.compile(r"(?:^|\s)#.*$")  # a YAML or shell comment: prose, where `credentials: ...` is a word
_GENERIC_NAMES = ("KEY", "PASS", "PAT", "TOKEN")  # in free text too common a word to mean a credential alone
REDACTED = "***"


@dataclass(frozen=True)
class Finding:
    """A credential found: where (a dotted path, `$.json.path` or `line N`) and what it looks like."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where} ({self.what})" if self.where else self.what


def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[^A-Za-z0-9]+", name.upper()) if p]


def secret_name(name: str) -> bool:
    """AWS_SECRET_ACCESS_KEY, WANDB_API_KEY, HF_TOKEN, db_password: yes; THALIA_STORE: no."""
    return any(p in SECRET_PARTS or p.endswith(_SECRET_SUFFIXES) for p in _parts(name))


def url_credential(text: str) -> bool:
    """Whether `text` holds a URL carrying a credential: a password in its user info (`postgres://me:pw@db`,
    `https://__token__:pypi-...@host/simple`), a token as the user name, or a credential query parameter.
    Plain `s3://bucket/key`, `https://host/simple` and `git+https://git@github.com/o/r` are fine."""
    for url in _URL.findall(text):
        try:
            netloc = urlsplit(url).netloc
        except ValueError:  # e.g. an unbalanced IPv6 bracket: not a URL anyone can use
            continue
        user, at, _ = netloc.rpartition("@")
        if at and (":" in user or len(user) >= TOKEN_USER_MIN):
            return True
        if _SECRET_QUERY.search(url):
            return True
    return False


def _aws_secret(candidate: str) -> bool:
    """40 base64 characters that look random: both cases and a digit, not a path."""
    return (any(c.isupper() for c in candidate) and any(c.islower() for c in candidate)
            and any(c.isdigit() for c in candidate) and not candidate.startswith("/")
            and candidate.count("/") <= 3 and "//" not in candidate)


def _random_hex(candidate: str) -> bool:
    """Hex digits that look random: both digits and letters."""
    digits = candidate.removeprefix("local-")
    return any(c.isdigit() for c in digits) and any(c.isalpha() for c in digits)


def shapes(value: str, name: str | None = None) -> list[str]:
    """What credentials `value` looks like (empty when none); `name` is what it is stored under, if known."""
    found = [what for what, pattern in _SHAPES if pattern.search(value)]
    if any(_aws_secret(m.group()) for m in _AWS_SECRET.finditer(value)):
        found.append("an AWS secret access key")
    if any(_random_hex(m.group()) for m in _HEX40.finditer(value)) and not (
            name and any(p in _DIGEST_PARTS for p in _parts(name))):
        found.append("a W&B API key")
    if url_credential(value):
        found.append("a URL with a credential")
    return found


def scan_tree(node: Any, where: str = "") -> list[Finding]:
    """Every credential in a parsed document (mappings, lists, strings): a value for a secret-looking name,
    a `name=value` item whose name looks secret (`--set`-style lists), and any value shaped like one."""
    return list(_scan(node, where, None))


def _scan(node: Any, where: str, name: str | None) -> Iterator[Finding]:
    if isinstance(node, str):
        for what in shapes(node, name):
            yield Finding(where, what)
    elif isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if secret_name(str(key)) and value not in (None, "") and not isinstance(value, (dict, list)):
                yield Finding(here, "a value for a secret-looking name")
            yield from _scan(value, here, str(key))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            here = f"{where}[{i}]"
            key, sep, value = item.partition("=") if isinstance(item, str) else ("", "", "")
            if sep and value.strip() and secret_name(key.strip().rsplit(".", 1)[-1]):
                yield Finding(f"{here} ({key.strip()}=...)", "a value for a secret-looking name")
            yield from _scan(item, here, key.strip().rsplit(".", 1)[-1] if sep else name)


def scan_text(text: str) -> list[Finding]:
    """Credentials in free text (a config file's lines, shell commands inside YAML strings, Markdown):
    shapes anywhere (comments included), and literal values assigned to secret-looking names outside
    comments (`AWS_ACCESS_KEY_ID=AKIA...`, `password: hunter2`; not `KEY=...` or `key: ${FROM_ENV}`)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        kinds = shapes(line)
        for match in _ASSIGNMENT.finditer(_COMMENT.sub("", line)):
            name, value = match.group("name"), match.group("value")
            if (secret_name(name) and name.upper() not in _GENERIC_NAMES and _literal(value)
                    and "a literal secret" not in kinds):
                kinds.append("a literal secret")
        found += [Finding(f"line {n}", what) for what in kinds]
    return found


def _literal(value: str) -> bool:
    """A value that is itself the secret: not a placeholder (`...`, `<your key>`, `***`)."""
    return any(c.isalnum() for c in value) and not value.startswith(("<", ".", "*"))


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by `***` (user info of URLs included), for
    anything printed or logged that may quote a user's value."""
    for _, pattern in _SHAPES:
        text = pattern.sub(REDACTED, text)
    text = _AWS_SECRET.sub(lambda m: REDACTED if _aws_secret(m.group()) else m.group(), text)
    text = _HEX40.sub(lambda m: REDACTED if _random_hex(m.group()) else m.group(), text)
    return _URL.sub(lambda m: _redact_url(m.group()), text)


def _redact_url(url: str) -> str:
    if not url_credential(url):
        return url
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if at and "/" not in userinfo:
        rest = f"{REDACTED}@{host}"
    return _SECRET_QUERY.sub(lambda m: m.group(1) + REDACTED, f"{scheme}{sep}{rest}")
