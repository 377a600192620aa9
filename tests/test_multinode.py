"""A 2-worker training run whose workers land on different Ray nodes, with data and results on S3.

The nodes (a head and two workers, all on this machine) are a `ray.cluster_utils.Cluster` built in a
subprocess of its own session, so the test session's in-process Ray is not disturbed and the whole
cluster can be ended by killing that session. Where the workers ran is read from Ray's state API
(the `RayTrainWorker` actors), not from anything the training code reports about itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from thalia_ray.bench.s3server import free_port
from thalia_ray.storage import S3Options, resolve
from thalia_ray.store import ExperimentStore

from tests.helpers import assert_tracked, kill_session

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "multinode-cls"

# Each worker node has 2 CPUs and each Train worker takes 1.5: one Train worker fits per node, and the
# rest (the head's CPU, 0.5 per node) is left to Ray Data's read tasks.
CLUSTER_SCRIPT = r"""
import json, os, sys
from ray.cluster_utils import Cluster

args = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": args["dashboard_port"]})
try:
    workers = [cluster.add_node(num_cpus=2, resources={f"thalia_node_{i}": 1}) for i in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    from ray.util.state import list_actors
    from thalia_ray import runtime
    from thalia_ray.config import load_config
    from thalia_ray.train.trainer import fit

    cfg = load_config(args["config"], args["overrides"])
    with runtime.start(cfg.runtime):
        result = fit(cfg, run_id=args["run_id"])
        actors = list_actors(address=f"http://127.0.0.1:{args['dashboard_port']}", limit=100,
                             filters=[("class_name", "=", "RayTrainWorker")], raise_on_missing_output=False)
        print("RESULT " + json.dumps({
            "run_id": result.run_id,
            "head": cluster.head_node.node_id,
            "workers": [node.node_id for node in workers],
            "train_nodes": [actor.node_id for actor in actors],
        }), flush=True)
finally:
    cluster.shutdown()
"""


def _copy_dataset(local: Path, url: str) -> None:
    """Put the synthetic dataset on the S3 endpoint, as a shared store all nodes read."""
    target = resolve(url, S3Options.from_environment())
    target.fs.put(f"{local}/", f"{target.path}/", recursive=True)
    assert target.join("annotations.json").exists(), f"copy of {local} to {url} is incomplete"


def _run_cluster(args: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(args)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)
    result = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result, f"multi-node run failed (exit {proc.returncode}):\n{output[-6000:]}"
    return json.loads(result[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_two_workers_on_two_nodes_read_and_write_s3(s3_bucket: str, synthetic_root: Path) -> None:
    data, store = f"{s3_bucket}/thalia", f"{s3_bucket}/store"
    _copy_dataset(synthetic_root, data)
    report = _run_cluster({
        "config": str(REPO / "configs/cls-single.yaml"),
        "overrides": [
            f"data.root={data}", f"storage.store={store}", "data.crop=32", "train.epochs=1",
            "train.max_steps_per_epoch=2", "train.batch_size=4", "train.num_workers=2",
            "train.cpus_per_worker=1.5", "train.device=cpu", "train.test_best=false", "runtime.data_cpu_limit=1",
            "runtime.wandb.mode=offline", "runtime.tracking=[wandb,tensorboard,mlflow]",
        ],
        "run_id": RUN_ID,
        "dashboard_port": free_port(),
    })

    assert report["run_id"] == RUN_ID
    train_nodes = set(report["train_nodes"])
    assert len(report["train_nodes"]) >= 2 and len(train_nodes) == 2, report
    assert train_nodes == set(report["workers"]) and report["head"] not in train_nodes

    run = ExperimentStore(resolve(store, S3Options.from_environment())).run(RUN_ID)
    assert run.read_status()["status"] == "finished"
    results = run.read_results()
    assert results is not None and results["metrics"] and results["best_checkpoint"]
    assert_tracked(run, epochs=1)  # uploaded to S3 by rank 0 on a worker node
    ray_storage = resolve(store, S3Options.from_environment()).join("ray")
    assert ray_storage.fs.find(ray_storage.path), "no Ray Train files (checkpoints) were written to S3"
