"""The one credential detector: names, shapes, free text, redaction, and every path that uses it."""
from __future__ import annotations

import pytest
import yaml

from thalia_ray import credentials, runtime
from thalia_ray.config import ConfigError, StorageConfig, load_config
from thalia_ray.manifests import credential_leaks

# Shaped like the real thing (the AWS values are AWS's own documentation examples), owned by nobody.
AWS_ID, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
GITHUB, GITHUB_PAT = "ghp_" + "a1B2c3D4e5" * 4, "github_pat_" + "11ABCDEFG0" * 3
HUGGING_FACE, WANDB = "hf_" + "aBcDeFgHiJ" * 3 + "kLmN", "0123456789abcdef0123456789abcdef01234567"
PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
SHAPED = {
    AWS_ID: "an AWS access key id", AWS_SECRET: "an AWS secret access key", GITHUB: "a GitHub token",
    GITHUB_PAT: "a GitHub token", HUGGING_FACE: "a Hugging Face token", WANDB: "a W&B API key",
    PRIVATE_KEY: "a private key", "postgres://me:hunter2@db/x": "a URL with a credential",
    "https://pkgs.example/simple?token=abc": "a URL with a credential",
}


@pytest.mark.parametrize("value,what", SHAPED.items(), ids=list(SHAPED.values()))
def test_each_shape_is_recognised_whatever_its_name(value: str, what: str) -> None:
    assert credentials.shapes(value) == [what]
    assert credentials.scan_tree({"env_vars": {"MISC": value}}) == [credentials.Finding("env_vars.MISC", what)]
    assert value not in credentials.redact(f"before {value} after") and "***" in credentials.redact(value)


@pytest.mark.parametrize("value", [
    "s3://thalia-ray-store/data/thalia-synthetic", "/mnt/data/thalia-synthetic/abcdefghijklmnopqrstuvwxyzABCDE12",
    "rayproject/ray:2.60.0-py311-gpu", "git+https://github.com/o/r@" + WANDB, "resnet18", "https://pypi.org/simple",
    "train-cls-single-20250301-142210-3fa9c2", "http://minio:9000", "a" * 40, "A1" * 20,
])
def test_ordinary_values_are_not_credentials(value: str) -> None:
    assert credentials.shapes(value) == [] and credentials.redact(value) == value


def test_a_digest_under_a_digest_name_is_not_a_wandb_key() -> None:
    assert credentials.shapes(WANDB, "GIT_COMMIT") == [] and credentials.shapes(WANDB, "IMAGE_SHA256") == []
    assert credentials.scan_tree({"env_vars": {"GIT_COMMIT": WANDB}}) == []
    assert credentials.scan_tree({"env_vars": {"BUILD": WANDB}}) != []


def test_names_and_assignments() -> None:
    assert credentials.secret_name("AWS_SECRET_ACCESS_KEY") and credentials.secret_name("db_password")
    assert not credentials.secret_name("THALIA_STORE") and not credentials.secret_name("TOKENIZERS_PARALLELISM")
    assert credentials.scan_tree(["train.lr=1", "storage.password=x"], "overrides") == [
        credentials.Finding("overrides[1] (storage.password=...)", "a value for a secret-looking name")]
    assert credentials.scan_text("export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...") == []  # placeholders
    assert credentials.scan_text("key: access-key-id   # a secretKeyRef's key is a name, not a secret") == []
    assert credentials.shapes(f"runtime.wandb.group={AWS_SECRET}") == ["an AWS secret access key"]
    assert credentials.scan_text("password: hunter2") == [credentials.Finding("line 1", "a literal secret")]
    assert credentials.scan_text(f"# an old key: {AWS_ID}") == [credentials.Finding("line 1", "an AWS access key id")]


def test_a_configuration_refuses_credentials_by_field_without_quoting_them() -> None:
    for override in (f"storage.endpoint_url=http://admin:{AWS_SECRET}@minio:9000", f"data.root=s3://{AWS_ID}/x",
                     f"runtime.wandb.group={HUGGING_FACE}"):
        with pytest.raises(ConfigError, match="credentials come from the environment") as err:
            load_config(None, [override])
        assert override.split("=", 1)[0] in str(err.value)
        assert not any(v in str(err.value) for v in (AWS_SECRET, AWS_ID, HUGGING_FACE))


def test_runtime_forwards_nothing_shaped_like_a_credential() -> None:
    environ = {"AWS_PROFILE": AWS_ID, "AWS_REGION": "eu-west-3", "AWS_ENDPOINT_URL": "http://u:pw@env:1"}
    assert runtime.storage_env_vars(StorageConfig(), environ) == {"AWS_REGION": "eu-west-3"}


def test_manifests_report_shapes_and_literal_env_values() -> None:
    text = yaml.safe_dump({"spec": {"env": [{"name": "OTHER", "value": AWS_SECRET},
                                            {"name": "HF_TOKEN", "value": "x"}]}})
    assert credential_leaks(text) == ["line 4: an AWS secret access key",
                                      "$.spec.env[1]: env 'HF_TOKEN' has a literal value"]
