"""The commands that take no run configuration (`runs`, `leaderboard`, `report`, `evaluate`, `predict`,
`export-model`) reach a store on an S3 endpoint given only on their command line
(`--set storage.endpoint_url=...`), with no endpoint in the environment: their storage settings are
resolved once and carried by every location they name (the store, `--out`, what the store records)."""
from __future__ import annotations

import json

import boto3
import pytest

from tests.helpers import ROOT_FRAMES, build_root, stored_run, upload_folder
from thalia_ray.cli import main
from thalia_ray.storage import S3Options, resolve
from thalia_ray.store import ExperimentStore


@pytest.fixture()
def s3_run(s3_bucket, tmp_path):
    """A finished classification run (seeded initial weights, one validation metric) in a store on S3,
    over a dataset root on local disk; (store URL, run id, data root)."""
    root = build_root(tmp_path / "root")
    _, run_id = stored_run(tmp_path / "store", root, task="classification")
    store_url = f"{s3_bucket}/store"
    upload_folder(tmp_path / "store", store_url)
    record = ExperimentStore(resolve(store_url, S3Options.from_environment())).run(run_id)
    checkpoint = f"{store_url.removeprefix('s3://')}/ray/{run_id}/checkpoint_000000"  # as Ray Train names it on S3
    record.write_results({"val/f1_deformation": 0.5, "val/loss": 0.7}, best_epoch=1, best_checkpoint=checkpoint)
    return store_url, run_id, root


def _keys(bucket_url: str, prefix: str, endpoint: str) -> list[str]:
    bucket = bucket_url.removeprefix("s3://")
    listed = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_store_only_commands_reach_an_endpoint_given_only_on_the_command_line(
        ray_cluster, s3_run, s3_bucket, moto_endpoint, monkeypatch, capsys):
    store_url, run_id, root = s3_run
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint is on the command line only
    given = ["--store", store_url, "--set", f"storage.endpoint_url={moto_endpoint}", "--json"]

    def run(*argv: str) -> dict | list:
        assert main([*argv, *given]) == 0
        return json.loads(capsys.readouterr().out)

    assert [row["run_id"] for row in run("runs", "list")] == [run_id]
    assert run("runs", "show", run_id)["status"] == "finished"
    assert [row["run_id"] for row in run("leaderboard")] == [run_id]
    assert "test/f1_deformation" in run("evaluate", run_id)["metrics"]
    frame = ROOT_FRAMES[0]
    predicted = run("predict", run_id, "--data", root, "--out", f"{s3_bucket}/predictions", "--frames", frame,
                    "--pairs", "all")
    assert predicted["written"] > 0 and predicted["out"] == f"{s3_bucket}/predictions"
    exported = run("export-model", run_id, "--format", "safetensors", "--out", f"{s3_bucket}/model/m.safetensors")
    assert (exported["path"], exported["card"]) == (f"{s3_bucket}/model/m.safetensors", f"{s3_bucket}/model/m.card.json")
    page = run("report", run_id)["page"]
    assert page == f"{store_url}/runs/{run_id}/report/index.html"
    written = _keys(s3_bucket, "", moto_endpoint)
    for key in ("model/m.safetensors", "model/m.card.json", f"store/runs/{run_id}/report/index.html"):
        assert key in written
    assert any(key.startswith("predictions/") for key in written)

    # the settings given are the ones used: a closed endpoint fails, named, within the timeout given
    closed = ["--store", store_url, "--set", "storage.endpoint_url=http://127.0.0.1:1", "--set", "storage.timeout_s=3"]
    assert main(["runs", "list", *closed]) != 0
    assert "127.0.0.1:1" in capsys.readouterr().err
