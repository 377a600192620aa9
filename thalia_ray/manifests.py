"""Offline validation of cluster configurations: KubeRay manifests and Ray cluster-launcher YAML.

Why: a CRD's OpenAPI schema does not forbid unknown fields, so the API server silently prunes a
misspelt key (`minReplica`) and the cluster comes up wrong; the cluster launcher reports a bad key only
once nodes are being provisioned. Validating here, as strictly as `kubectl apply --validate=strict`,
turns both into an error with a JSON path before anything is deployed.

Not checked: CEL rules (`x-kubernetes-validations`), string `format`s, and whatever the operator
itself rejects at reconcile time apart from the worker-group replica bounds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from thalia_ray import safe_yaml
from thalia_ray.credentials import scan_text, secret_name
from thalia_ray.errors import ManifestProblem, excerpt

CRDS_ENV = "THALIA_CRDS"  # where the KubeRay CRDs are when `--crds` is not given
CRDS_HOWTO = ("give the KubeRay CRDs with --crds PATH or THALIA_CRDS=PATH: a folder of CRD YAML files, or the "
              "output of `kubectl get crd rayclusters.ray.io rayjobs.ray.io -o yaml`")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# ObjectMeta as a manifest may set it; Kubernetes validates metadata itself, the CRD says only `object`.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT_META: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}



class ManifestError(ManifestProblem):
    """A CRD or schema file is missing or unusable (not a finding about the manifest itself)."""


# ------------------------------------------------------------------------------------------ YAML
def load_documents(path: str | Path) -> list[Any]:
    """All YAML documents of a manifest file (empty documents dropped), read by `safe_yaml`: duplicate keys
    refused, as strict server-side validation does, and alias bombs too."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read ({err})") from None
    try:
        return [doc for doc in safe_yaml.load_all(text) if doc is not None]
    except safe_yaml.YamlError as err:
        raise ManifestError(f"{path}: {err}") from None


# ------------------------------------------------------------------------------------------- CRDs
@dataclass(eq=False)
class Crd:
    """One CustomResourceDefinition, where it was read from, and its strict validators per version."""

    doc: dict[str, Any]
    source: str
    _validators: dict[str, jsonschema.Draft7Validator] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        return self.doc["spec"]["names"]["kind"]

    def served(self) -> dict[str, str]:
        """apiVersion → version name, for the versions the CRD serves."""
        group = self.doc["spec"]["group"]
        return {f"{group}/{v['name']}": v["name"] for v in self.doc["spec"]["versions"] if v.get("served")}

    def validator(self, version: str) -> jsonschema.Draft7Validator:
        if version not in self._validators:
            spec = next(v for v in self.doc["spec"]["versions"] if v["name"] == version)
            schema = strict_schema(spec["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = _OBJECT_META
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            self._validators[version] = jsonschema.Draft7Validator(schema)
        return self._validators[version]


def load_crds(source: str | Path | None = None) -> dict[str, Crd]:
    """The CRDs under `source` (else $THALIA_CRDS), by kind: a folder of YAML files, or one file with
    several documents or a `kind: List` (what `kubectl get crd ... -o yaml` prints).

    The package ships no CRDs: they belong to the KubeRay version the cluster runs.
    """
    source = source or os.environ.get(CRDS_ENV)
    if not source:
        raise ManifestError(f"no KubeRay CRDs: {CRDS_HOWTO}")
    return _crds_at(Path(source).resolve())


@functools.lru_cache(maxsize=8)
def _crds_at(path: Path) -> dict[str, Crd]:
    """`load_crds` for one resolved path, cached so that each CRD's validators compile once per process."""
    if not path.exists():
        raise ManifestError(f"KubeRay CRDs {path}: no such file or folder; {CRDS_HOWTO}")
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json")) if path.is_dir() else [path]
    crds: dict[str, Crd] = {}
    for file in files:
        for doc in _load_crd_file(file):
            items = doc.get("items") or [] if doc.get("kind") == "List" else [doc]
            for item in items:
                if isinstance(item, dict) and item.get("kind") == "CustomResourceDefinition":
                    crd = Crd(item, str(file))
                    crds[crd.kind] = crd
    if not crds:
        raise ManifestError(f"KubeRay CRDs {path}: no CustomResourceDefinition found; {CRDS_HOWTO}")
    return crds


def _load_crd_file(path: Path) -> tuple[dict[str, Any], ...]:
    """The mapping documents of one CRD file."""
    try:
        docs = yaml.load_all(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        return tuple(doc for doc in docs if isinstance(doc, dict))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ManifestError(f"cannot read CRD file {path}: {' '.join(str(err).split())}") from None


def crd_for(kind: str, crds: Mapping[str, Crd]) -> Crd:
    """The CRD of `kind`, or an error naming what was given."""
    if kind not in crds:
        sources = sorted({c.source for c in crds.values()})
        raise ManifestError(f"no CRD for kind {kind!r} in {', '.join(sources)} (it has {sorted(crds)}); {CRDS_HOWTO}")
    return crds[kind]


def strict_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON schema from a structural OpenAPI v3 schema, rejecting unknown fields.

    Objects reject keys their schema does not list unless it preserves unknown fields or gives
    `additionalProperties`; int-or-string becomes a plain type union; `nullable` admits null.
    """
    out: dict[str, Any] = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if "properties" in node:
        out["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), Mapping):
            out[key] = strict_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [strict_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    preserves = node.get("x-kubernetes-preserve-unknown-fields") is True
    is_object = "properties" in node or node.get("type") == "object"
    if is_object and not preserves and "additionalProperties" not in node:
        out["additionalProperties"] = False  # structural schemas prune every unlisted field
    return out


# ----------------------------------------------------------------------------------- validation
def validate_manifest(doc: Any, crd: Crd) -> list[str]:
    """Errors (each prefixed with its JSON path) of a custom resource against its CRD; [] when valid."""
    if not isinstance(doc, dict):
        return [f"$: a manifest must be a mapping, got {type(doc).__name__}"]
    if doc.get("kind") != crd.kind:
        return [f"$.kind: {excerpt(doc.get('kind'))} does not match the CRD's kind {crd.kind!r}"]
    served = crd.served()
    if doc.get("apiVersion") not in served:
        wanted = doc.get("apiVersion")
        return [f"$.apiVersion: {excerpt(wanted)} is not served for {crd.kind} (served: {sorted(served)})"]
    errors = _schema_errors(crd.validator(served[doc["apiVersion"]]), doc)
    return errors + _metadata_errors(doc.get("metadata")) + _replica_errors(doc.get("spec"))


@dataclass(frozen=True)
class FileReport:
    """What `validate_file` found: problems make the file invalid, warnings are printed beside "valid"."""

    problems: list[str]
    warnings: list[str]


def validate_file(path: str | Path, crds_source: str | Path | None = None) -> FileReport:
    """Every problem of a cluster configuration file, each prefixed with its document number:
    KubeRay resources against their CRDs (read only when the file holds one), cluster-launcher
    configs against Ray's schema, literal credentials anywhere, and what the schemas let through but
    the cluster would not run (`reality_checks`: ports, quantities, the Ray version of images)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read ({err})") from None
    docs = load_documents(path)
    if not docs:
        raise ManifestError(f"{path}: no YAML documents")
    crds: dict[str, Crd] | None = None
    problems = [f"credentials: {leak}" for leak in credential_leaks(text)]
    warnings = []
    for n, doc in enumerate(docs):
        if isinstance(doc, dict) and "apiVersion" in doc:
            crds = crds if crds is not None else load_crds(crds_source)
            errors = validate_manifest(doc, crd_for(str(doc.get("kind")), crds))
        else:
            errors = validate_cluster_launcher(doc)
        real = reality_checks(doc)
        problems += [f"document {n}: {e}" for e in [*errors, *real.problems]]
        warnings += [f"document {n}: {w}" for w in real.warnings]
    return FileReport(problems, warnings)


def _metadata_errors(meta: Any) -> list[str]:
    """Name and label rules that Kubernetes enforces on ObjectMeta (the CRD leaves them out)."""
    if not isinstance(meta, dict):
        return []
    errors = []
    for field in ("name", "namespace"):
        value = meta.get(field)
        if isinstance(value, str) and not (len(value) <= 63 and _DNS1123_LABEL.match(value)):
            errors.append(
                f"$.metadata.{field}: {excerpt(value)} is not a DNS-1123 label "
                "(lowercase letters, digits and '-', alphanumeric at both ends, at most 63 characters)"
            )
    for key, value in (meta.get("labels") or {}).items():
        if not _valid_label_key(key):
            errors.append(f"$.metadata.labels: key {excerpt(key)} is not a valid label key")
        if isinstance(value, str) and value and not (len(value) <= 63 and _LABEL_NAME.match(value)):
            where = json_path(["metadata", "labels", key])
            errors.append(f"{where}: value {excerpt(value)} is not a valid label value")
    return errors


def _valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    prefix_ok = not prefix or (len(prefix) <= 253 and bool(_DNS1123_SUBDOMAIN.match(prefix)))
    return prefix_ok and len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _replica_errors(spec: Any) -> list[str]:
    """Worker-group bounds the KubeRay operator refuses: minReplicas ≤ replicas ≤ maxReplicas."""
    if not isinstance(spec, dict):
        return []
    cluster, prefix = spec, "$.spec"
    if isinstance(spec.get("rayClusterSpec"), dict):  # a RayJob carries its cluster one level down
        cluster, prefix = spec["rayClusterSpec"], "$.spec.rayClusterSpec"
    errors = []
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if not isinstance(group, dict):
            continue
        bounds = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        numbers = [b for b in bounds if isinstance(b, int)]
        if numbers != sorted(numbers):
            errors.append(
                f"{prefix}.workerGroupSpecs[{i}]: need minReplicas <= replicas <= maxReplicas, "
                f"got {dict(zip(('minReplicas', 'replicas', 'maxReplicas'), bounds))}"
            )
    return errors


def validate_cluster_launcher(doc: Any) -> list[str]:
    """Errors of a `ray up` cluster config against the installed Ray's ray-schema.json; [] when valid.

    Adds the cross-field rules Ray checks after the schema (head type declared, worker bounds).
    """
    errors = _schema_errors(_launcher_validator(), doc)
    if errors or not isinstance(doc, dict) or "available_node_types" not in doc:
        return errors
    types = doc["available_node_types"]
    head = doc.get("head_node_type")
    if head not in types:
        errors.append(f"$.head_node_type: {excerpt(head)} is not one of available_node_types {sorted(types)}")
    for name, node_type in types.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
        if high is not None and low > high:
            where = json_path(["available_node_types", name])
            errors.append(f"{where}: min_workers {low} > max_workers {high}")
    total_min = sum(t.get("min_workers", 0) for t in types.values())
    if "max_workers" in doc and total_min > doc["max_workers"]:
        errors.append(f"$.max_workers: {doc['max_workers']} is below the sum of min_workers {total_min}")
    return errors


@functools.lru_cache(maxsize=1)
def _launcher_validator() -> jsonschema.Draft7Validator:
    spec = importlib.util.find_spec("ray")  # locate without importing Ray itself
    if spec is None or not spec.submodule_search_locations:
        raise ManifestError("ray is not installed: its autoscaler schema is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    try:
        return jsonschema.Draft7Validator(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"cannot read Ray's cluster schema {path}: {err}") from None


def _schema_errors(validator: jsonschema.Draft7Validator, doc: Any) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [line for err in errors for line in _describe(err)]


def _describe(err: jsonschema.ValidationError) -> list[str]:
    """One line per problem; unknown fields are named by their own path, as kubectl does."""
    path = list(err.absolute_path)
    if err.validator == "additionalProperties" and err.validator_value is False:
        known = set(err.schema.get("properties", {}))
        patterns = [re.compile(p) for p in err.schema.get("patternProperties", {})]
        unknown = [
            k for k in err.instance if k not in known and not any(p.search(k) for p in patterns)
        ]
        return [f"{json_path([*path, k])}: unknown field {k!r}" for k in unknown]
    return [f"{json_path(path)}: {err.message}"]


def json_path(parts: Iterable[str | int]) -> str:
    """`$.spec.workerGroupSpecs[0]['nvidia.com/gpu']`-style path."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


# ---------------------------------------------------------------------------------- reality
# What a schema lets through but a cluster refuses or runs wrongly. The CRDs type a port as int32 and a
# quantity as int-or-string; Kubernetes checks the range and the grammar only when the pod is created.
PORT_KEYS = ("containerPort", "hostPort", "port", "targetPort", "nodePort")
_PORT_PARAM = re.compile(r"(^|[-_])port$")  # rayStartParams: dashboard-port, ray-client-server-port, ...
# A Kubernetes resource quantity: a number with a binary (Ki..Ei), decimal (n..E) or exponent suffix.
_QUANTITY = re.compile(r"^(?P<sign>[+-]?)(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|"
                       r"[eE][+-]?[0-9]+)?$")
_SUFFIX_SCALE = {"": 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
                 "E": 1e18, **{s: 1024.0 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}
# Images of Ray's own repositories carry Ray's version in their tag: rayproject/ray:2.60.0-py311-gpu.
_RAY_IMAGE = re.compile(r"(^|/)(ray|ray-ml|ray-llm):(?P<version>[0-9]+\.[0-9]+\.[0-9]+)")


@dataclass(frozen=True)
class Reality:
    problems: list[str]
    warnings: list[str]


def reality_checks(doc: Any, installed_ray: str | None = None) -> Reality:
    """Ports outside 1-65535, negative resource quantities or requests above their limit, and images or `rayVersion` of another Ray than the installed one (`installed_ray`, default the
    installed package): another minor version is an error (the service's Ray Train, Tune and Jobs code
    and the cluster must speak the same Ray), another patch release a warning (compatible, but a run is
    only reproducible on the version it ran on). See docs/clusters.md."""
    installed = installed_ray or _installed_ray()
    problems: list[str] = []
    warnings: list[str] = []
    for path, key, value in _walk(doc, []):
        where = json_path([*path, key])
        if key in PORT_KEYS or (isinstance(key, str) and path[-1:] == ["rayStartParams"] and _PORT_PARAM.search(key)):
            port = _integer(value)
            if port is not None and not 1 <= port <= 65535:
                problems.append(f"{where}: port {port} is outside 1-65535")
        if key == "resources" and isinstance(value, dict):
            problems += _quantity_errors(value, [*path, key])
        version = _ray_version(key, value)
        if version is not None and installed is not None and version != installed:
            same_minor = version.split(".")[:2] == installed.split(".")[:2]
            text = (f"{where}: Ray {version} there, Ray {installed} installed here: "
                    + ("patch releases differ" if same_minor else "use an image of the installed Ray's release "
                       "(the service's Ray Train, Tune and Jobs code runs on it)"))
            (warnings if same_minor else problems).append(text)
    return Reality(problems, warnings)


def _walk(node: Any, path: list[str | int]) -> Iterable[tuple[list[str | int], str | int, Any]]:
    """(path of the parent, key, value) of every entry of every mapping and list under `node`."""
    items: Iterable[tuple[str | int, Any]] = (
        node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ())
    for key, value in items:
        yield path, key, value
        yield from _walk(value, [*path, key])


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else None


def _quantity(value: Any) -> float | None:
    """A quantity's value (cpu: cores, memory: bytes; negative if signed so), or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = _QUANTITY.match(value.strip())
    if match is None:
        return None
    suffix = match.group("suffix") or ""
    scale = 10.0 ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX_SCALE[suffix]
    return (-1.0 if match.group("sign") == "-" else 1.0) * float(match.group("number")) * scale


def _quantity_errors(resources: dict[str, Any], path: list[str | int]) -> list[str]:
    """Negative quantities under requests/limits (the CRDs' pattern admits a sign; pods refuse it), and
    requests above their limit. The grammar itself is the CRDs' (or, in a launcher config, Ray's) to check."""
    errors = []
    parsed: dict[str, dict[str, float]] = {}
    for section in ("requests", "limits"):
        for name, value in (resources.get(section) or {}).items() if isinstance(resources.get(section), dict) else ():
            amount = _quantity(value)
            if amount is not None and amount < 0:
                errors.append(f"{json_path([*path, section, name])}: {excerpt(value)} is negative")
            elif amount is not None:
                parsed.setdefault(section, {})[name] = amount
    for name, request in parsed.get("requests", {}).items():
        limit = parsed.get("limits", {}).get(name)
        if limit is not None and request > limit:
            errors.append(f"{json_path([*path, 'requests', name])}: request {excerpt(resources['requests'][name])} exceeds "
                          f"its limit {excerpt(resources['limits'][name])}")
    return errors


def _ray_version(key: str | int, value: Any) -> str | None:
    """The Ray version an entry names: `rayVersion`, or the tag of a Ray image."""
    if not isinstance(value, str) or not isinstance(key, str):
        return None
    if key == "rayVersion":
        match = re.match(r"^[0-9]+\.[0-9]+\.[0-9]+", value.strip())
        return match.group() if match else None
    if key == "image" or key.endswith(("_image", "image_uri")):
        match = _RAY_IMAGE.search(value)
        return match.group("version") if match else None
    return None


def _installed_ray() -> str | None:
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------- credentials
def credential_leaks(text: str) -> list[str]:
    """Where a config text carries a literal credential (`credentials.scan_text`: keys and tokens by their
    shape, `secret: value` assignments), and env entries named like a secret with a literal `value` (they
    must use secretKeyRef)."""
    leaks = [f"{found.where}: {found.what}" for found in scan_text(text)]
    try:
        docs = safe_yaml.load_all(text)
    except safe_yaml.YamlError:
        return leaks  # not YAML (e.g. Markdown): the line scan is all there is
    return leaks + [
        f"{path}: env {name!r} has a literal value"
        for doc in docs
        for path, name in _literal_secret_env(doc, [])
    ]


def _literal_secret_env(node: Any, path: list[str | int]) -> list[tuple[str, str]]:
    found = []
    if isinstance(node, dict):
        name, value = node.get("name"), node.get("value")
        if isinstance(name, str) and secret_name(name) and value not in (None, ""):
            found.append((json_path(path), name))
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return []
    for key, child in items:
        found += _literal_secret_env(child, [*path, key])
    return found

