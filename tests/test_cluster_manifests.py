"""Cluster configurations under cluster/ validate strictly, and the validator catches what it must."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from thalia_ray import manifests
from thalia_ray.jobs import load_spec
from thalia_ray.manifests import (
    ManifestError,
    credential_leaks,
    crd_for,
    load_crds,
    load_documents,
    strict_schema,
    validate_cluster_launcher,
    validate_file,
    validate_manifest,
)

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
KUBERAY_FILES = sorted((CLUSTER / "kuberay").glob("*.yaml"))
GPU_IMAGE = "rayproject/ray:2.60.0-py311-gpu"


@pytest.fixture(autouse=True)
def _crds_given(kuberay_crds):
    """Every test here sees the CRDs the way a user gives them: THALIA_CRDS."""


def _crd(kind: str) -> manifests.Crd:
    return crd_for(kind, load_crds())


def _kuberay(name: str) -> dict[str, Any]:
    (doc,) = load_documents(CLUSTER / "kuberay" / name)
    return doc


def _with(doc: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    """A copy of `doc` with `value` set at `path`; the JSON round trip unshares YAML anchors."""
    out = json.loads(json.dumps(doc))
    node: Any = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def _errors(doc: dict[str, Any]) -> list[str]:
    return validate_manifest(doc, _crd(doc["kind"]))


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return _kuberay("raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _kuberay("rayjob-sweep.yaml")


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    (doc,) = load_documents(CLUSTER / "aws-gpu.yaml")
    return doc


# ------------------------------------------------------------------------------ KubeRay manifests
def test_the_expected_manifests_exist():
    assert {p.name for p in KUBERAY_FILES} >= {"raycluster.yaml", "rayjob-sweep.yaml"}


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_every_kuberay_manifest_validates_strictly(path: Path):
    docs = load_documents(path)
    assert docs
    for doc in docs:
        assert _errors(doc) == []


@pytest.mark.parametrize(
    ("name", "path", "expected"),
    [
        ("raycluster.yaml", ["spec", "headGroupSpec", "bogus"], "$.spec.headGroupSpec.bogus"),
        (
            "raycluster.yaml",
            ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limitz"],
            "$.spec.workerGroupSpecs[0].template.spec.containers[0].resources.limitz",
        ),
        (
            "rayjob-sweep.yaml",
            ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
             "env", 3, "valueFrom", "secretKeyRef", "optinal"],
            "$.spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]"
            ".env[3].valueFrom.secretKeyRef.optinal",
        ),
        ("rayjob-sweep.yaml", ["spec", "shutdownAfterJobFinish"], "$.spec.shutdownAfterJobFinish"),
        ("raycluster.yaml", ["metadata", "labelz"], "$.metadata.labelz"),
    ],
)
def test_unknown_fields_are_rejected_with_their_path(name, path, expected):
    errors = _errors(_with(_kuberay(name), path, True))
    assert errors == [f"{expected}: unknown field {path[-1]!r}"]


def test_wrong_types_are_rejected(raycluster, rayjob):
    errors = _errors(_with(raycluster, ["spec", "workerGroupSpecs", 0, "maxReplicas"], "eight"))
    assert errors == ["$.spec.workerGroupSpecs[0].maxReplicas: 'eight' is not of type 'integer'"]
    errors = _errors(_with(rayjob, ["spec", "shutdownAfterJobFinishes"], "yes"))
    assert errors == ["$.spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"]
    errors = _errors(_with(raycluster, ["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0))
    assert errors == ["$.spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"]


def test_int_or_string_quantities(raycluster):
    limits = ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits"]
    limits_path = "$.spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits"
    for quantity in (4, "4", "3500m"):
        assert _errors(_with(raycluster, [*limits, "cpu"], quantity)) == []
    for quantity in ([4], {"n": 4}, 4.5):
        (error,) = _errors(_with(raycluster, [*limits, "cpu"], quantity))
        assert error.startswith(f"{limits_path}.cpu:")
    (error,) = _errors(_with(raycluster, [*limits, "cpu"], "four"))
    assert "does not match" in error


def test_required_fields_and_enums(raycluster):
    group = copy.deepcopy(raycluster["spec"]["workerGroupSpecs"][0])
    del group["groupName"]
    errors = _errors(_with(raycluster, ["spec", "workerGroupSpecs", 0], group))
    assert errors == ["$.spec.workerGroupSpecs[0]: 'groupName' is a required property"]
    (error,) = _errors(_with(raycluster, ["spec", "autoscalerOptions", "upscalingMode"], "Fast"))
    assert error.startswith("$.spec.autoscalerOptions.upscalingMode: 'Fast' is not one of")


def test_api_version_kind_and_metadata(raycluster):
    assert _errors(_with(raycluster, ["apiVersion"], "ray.io/v1alpha1")) == []  # still served
    (error,) = _errors(_with(raycluster, ["apiVersion"], "ray.io/v2"))
    assert error.startswith("$.apiVersion: 'ray.io/v2' is not served for RayCluster")
    (error,) = validate_manifest(_with(raycluster, ["kind"], "RayJob"), _crd("RayCluster"))
    assert error.startswith("$.kind: 'RayJob' does not match")
    (error,) = _errors(_with(raycluster, ["metadata", "name"], "Thalia_Ray"))
    assert error.startswith("$.metadata.name: 'Thalia_Ray' is not a DNS-1123 label")
    assert _errors(_with(raycluster, ["metadata", "name"], "x" * 64))
    (error,) = _errors(_with(raycluster, ["metadata", "labels", "app"], "a b"))
    assert error.startswith("$.metadata.labels.app: value 'a b'")
    assert "'name' is a required property" in _errors(_with(raycluster, ["metadata"], {}))[0]


def test_replica_bounds_are_checked(raycluster, rayjob):
    errors = _errors(_with(raycluster, ["spec", "workerGroupSpecs", 1, "minReplicas"], 9))
    assert len(errors) == 1 and errors[0].startswith("$.spec.workerGroupSpecs[1]: need minReplicas")
    errors = _errors(_with(rayjob, ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"], 5))
    assert len(errors) == 1 and errors[0].startswith("$.spec.rayClusterSpec.workerGroupSpecs[0]:")


def test_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("apiVersion: ray.io/v1\nkind: RayCluster\nkind: RayJob\n")
    with pytest.raises(ManifestError, match="duplicate key 'kind' at line 3"):
        load_documents(path)


def test_strict_schema_honours_preserve_unknown_fields_and_nullable():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                         "properties": {"known": {"type": "string"}}},
                "closed": {"type": "object", "properties": {"known": {"type": "string"}}},
                "empty": {"type": "object"},
                "maybe": {"type": "string", "nullable": True},
                "port": {"x-kubernetes-int-or-string": True},
            },
        }
    )
    validator = jsonschema.Draft7Validator(schema)
    ok = {"free": {"known": "a", "extra": 1}, "closed": {"known": "b"}, "empty": {},
          "maybe": None, "port": "http"}
    assert list(validator.iter_errors(ok)) == []
    for bad in ({"closed": {"extra": 1}}, {"empty": {"x": 1}}, {"top": 1}, {"port": 1.5},
                {"free": {"known": 3}}):
        assert list(validator.iter_errors(bad)), bad


def test_crds_come_from_the_option_the_environment_or_kubectl_output(tmp_path, monkeypatch, kuberay_crds):
    assert set(load_crds()) == {"RayCluster", "RayJob"}  # THALIA_CRDS: a folder
    crds = [json.loads(json.dumps(c.doc)) for c in load_crds().values()]
    listed = tmp_path / "kubectl-get-crd.yaml"  # `kubectl get crd a b -o yaml` prints a List
    listed.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}))  # JSON is YAML
    assert {k: c.source for k, c in load_crds(listed).items()} == {"RayCluster": str(listed), "RayJob": str(listed)}
    doc = load_documents(CLUSTER / "kuberay" / "raycluster.yaml")[0]
    assert validate_manifest(doc, crd_for("RayCluster", load_crds(listed))) == []
    with pytest.raises(ManifestError, match=r"no CRD for kind 'RayService' .*kubectl get crd"):
        crd_for("RayService", load_crds(listed))


@pytest.mark.parametrize("given,message", [
    (None, "no KubeRay CRDs: give the KubeRay CRDs with --crds PATH or THALIA_CRDS"),
    ("absent", "no such file or folder"),
    ("empty", "no CustomResourceDefinition found"),
])
def test_missing_crds_are_a_clear_error(tmp_path, monkeypatch, given, message):
    monkeypatch.delenv("THALIA_CRDS")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=message):
        load_crds(tmp_path / given if given else None)


def test_validate_file_reads_crds_only_for_kuberay_resources(tmp_path, monkeypatch):
    monkeypatch.delenv("THALIA_CRDS")
    assert validate_file(CLUSTER / "aws-gpu.yaml") == manifests.FileReport([], [])
    with pytest.raises(ManifestError, match="no KubeRay CRDs"):
        validate_file(CLUSTER / "kuberay" / "raycluster.yaml")


# ----------------------------------------------------------------------- what the manifests say
def _containers(cluster_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]
    ]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-sweep.yaml"])
def test_cluster_shape_store_and_secrets(name):
    doc = _kuberay(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["enableInTreeAutoscaling"] is True
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert 0 == gpu["minReplicas"] < gpu["maxReplicas"]
    for name_, container in _containers(spec):
        assert container["image"] == GPU_IMAGE
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert (gpus >= 1) == (name_ == "gpu"), name_
        env = {e["name"]: e for e in container["env"]}
        assert env["THALIA_STORE"]["value"].startswith("s3://")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["name"]


def test_rayjob_runs_the_sweep_with_a_valid_runtime_env(rayjob):
    from ray.runtime_env import RuntimeEnv

    spec = rayjob["spec"]
    # the very command `thalia-ray submit jobs/sweep-backbones.yaml` would run, less the per-submission
    # `--sweep-id` (a RayJob is applied once; its sweep names itself)
    submitted = load_spec(CLUSTER.parent / "jobs" / "sweep-backbones.yaml").entrypoint
    assert " --sweep-id " in submitted
    assert spec["entrypoint"] == submitted.rsplit(" --sweep-id ", 1)[0]
    assert "thalia-ray sweep configs/sweep-backbones.yaml" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # Ray's own validation
    assert any(p.startswith("thalia-ray @ ") for p in runtime_env["pip"]["packages"])
    assert credential_leaks(spec["runtimeEnvYAML"]) == []


# ---------------------------------------------------------------------------- cluster launcher
def test_launcher_config_validates_against_ray_schema(launcher):
    assert validate_cluster_launcher(launcher) == []
    assert launcher["docker"]["image"] == GPU_IMAGE
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} >= {"g5.xlarge", "g5.12xlarge"}
    assert all(t["min_workers"] < t["max_workers"] for t in gpu_types.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any("pip install" in cmd and "thalia-ray" in cmd for cmd in launcher["setup_commands"])
    assert any("THALIA_STORE=s3://" in opt for opt in launcher["docker"]["run_options"])


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (["idle_timeout_minute"], 5, "$.idle_timeout_minute: unknown field 'idle_timeout_minute'"),
        (["available_node_types", "gpu-1x", "min_worker"], 1,
         "$.available_node_types.gpu-1x.min_worker: unknown field 'min_worker'"),
        (["docker", "imagee"], "x", "$.docker.imagee: unknown field 'imagee'"),
        (["available_node_types", "gpu-1x", "resources", "GPU"], 0.5,
         "$.available_node_types.gpu-1x.resources.GPU: 0.5 is not of type 'integer'"),
        (["head_node_type"], "gpu", "$.head_node_type: 'gpu' is not one of available_node_types"),
        (["max_workers"], 0, "$.max_workers: 0 is below the sum of min_workers"),
        (["available_node_types", "cpu", "max_workers"], -1,
         "$.available_node_types.cpu: min_workers 0 > max_workers -1"),
    ],
)
def test_launcher_errors(launcher, path, value, expected):
    doc = _with(launcher, path, value)
    if path == ["max_workers"]:
        doc = _with(doc, ["available_node_types", "gpu-1x", "min_workers"], 1)
    errors = validate_cluster_launcher(doc)
    assert len(errors) == 1 and errors[0].startswith(expected), errors


# --------------------------------------------------------------------------------- credentials
def test_no_literal_credentials_under_cluster():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 5
    for path in files:
        assert credential_leaks(path.read_text()) == [], path


def test_the_credential_scan_finds_literals():
    fake_id = "AKIA" + "Q" * 16
    assert credential_leaks(f"run_options: [--env KEY={fake_id}]") == ["line 1: an AWS access key id"]
    assert credential_leaks(f"- --env AWS_ACCESS_KEY_ID={fake_id}") == [
        "line 1: an AWS access key id",
        "line 1: a literal secret",
    ]
    assert credential_leaks("provider:\n  aws_secret_access_key: abc123\n") == ["line 2: a literal secret"]
    assert credential_leaks("aws_secret_access_key: ${FROM_ENV}\n") == []
    entries = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"},
        {"name": "THALIA_STORE", "value": "s3://b"},
    ]
    env = yaml.safe_dump({"env": entries})
    assert credential_leaks(env) == ["$.env[0]: env 'AWS_SECRET_ACCESS_KEY' has a literal value"]


# ----------------------------------------------------------------------------------- reality
@pytest.mark.parametrize("path,value,expected", [
    (["spec", "headGroupSpec", "template", "spec", "containers", 0, "ports", 0, "containerPort"], 99999,
     "ports[0].containerPort: port 99999 is outside 1-65535"),
    (["spec", "headGroupSpec", "rayStartParams", "dashboard-port"], "0", "dashboard-port: port 0 is outside"),
    (["spec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "requests", "memory"], "-8Gi",
     "requests.memory: '-8Gi' is negative"),
    (["spec", "headGroupSpec", "template", "spec", "containers", 0, "resources", "requests", "cpu"], "6",
     "requests.cpu: request '6' exceeds its limit '4'"),
    (["spec", "headGroupSpec", "template", "spec", "containers", 0, "image"], "rayproject/ray:2.9.0",
     "image: Ray 2.9.0 there, Ray 2.60.0 installed here"),
    (["spec", "rayVersion"], "2.9.0", "rayVersion: Ray 2.9.0 there"),
], ids=["container-port", "ray-port-param", "negative-quantity", "request-above-limit", "ray-image", "ray-version"])
def test_what_the_schema_lets_through_but_a_cluster_would_not_run(raycluster, path, value, expected):
    assert _errors(_with(raycluster, path, value)) == []  # the CRD alone accepts it
    reality = manifests.reality_checks(_with(raycluster, path, value), installed_ray="2.60.0")
    assert len(reality.problems) == 1 and expected in reality.problems[0], reality.problems
    assert manifests.reality_checks(raycluster, installed_ray="2.60.0") == manifests.Reality([], [])


def test_another_patch_release_of_ray_is_a_warning(tmp_path, raycluster):
    patched = json.loads(json.dumps(raycluster).replace("rayproject/ray:2.60.0", "rayproject/ray:2.60.9"))
    reality = manifests.reality_checks(patched, installed_ray="2.60.0")
    assert reality.problems == [] and len(reality.warnings) == 3
    assert all("Ray 2.60.9 there, Ray 2.60.0 installed here: patch releases differ" in w for w in reality.warnings)
    assert manifests.reality_checks({"image": "myrepo/thalia:1.0"}, installed_ray="2.60.0") == manifests.Reality([], [])


def test_quantities_follow_the_kubernetes_grammar():
    assert [manifests._quantity(v) for v in ("500m", "2", "8Gi", "1e3", "1.5", ".5", 3, "-1")] == [
        0.5, 2.0, 8 * 2**30, 1000.0, 1.5, 0.5, 3.0, -1.0]
    assert [manifests._quantity(v) for v in ("8GB", "two", "", True)] == [None] * 4
