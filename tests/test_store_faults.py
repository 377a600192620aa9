"""An experiment store in a bucket that throttles and drops connections: moto behind the fault proxy,
over real HTTP. A run's records (config, status, history, skipped samples, results and the pointer to
its best checkpoint, the checkpoint itself) are written as training writes them; every record read back
from the bucket afterwards is whole and holds what was written, or the write failed with an error that
says where and a rerun of the same run id completes. No result is lost either way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

from thalia_ray.bench.proxy import Distance, ProxyThread
from thalia_ray.config import load_config
from thalia_ray.storage import S3Options, StorageError, resolve
from thalia_ray.store import ExperimentStore
from thalia_ray.train.checkpoint import load_state, save_state
from thalia_ray.train.evaluate import best_checkpoint

EPOCHS = 3
# every request of the store faulted at these rates: a busy bucket, far above what S3 sends
FAULTS = Distance(slowdown=0.12, reset=0.08, stall=0.02, stall_s=1.0, seed=5)


def _history(run: int, epochs: int) -> list[dict[str, Any]]:
    return [{"epoch": e, "train/loss": 1.0 / e + run, "val/f1_deformation": e / 10 + run / 100}
            for e in range(1, epochs + 1)]


def _state(run: int, epoch: int) -> dict[str, Any]:
    return {"model": {"weight": torch.arange(4096, dtype=torch.float32) * (run + epoch)}, "progress": {"epoch": epoch}}


def _write_run(store: ExperimentStore, run: int, tmp: Path) -> None:
    """Run `run`'s records, in the order `fit` and the training loop write them: the whole history at
    every epoch with that epoch's checkpoint uploaded to Ray's storage (as Ray Train does), then the
    skipped samples, the results pointing at the best checkpoint, and the final status."""
    cfg = load_config(None, [f"name=run-{run}"])
    lease = store.run(f"run-{run}").acquire(settle_s=0.0)
    record = lease.record
    try:
        record.write_config(cfg)
        record.set_status("running", name=cfg.name, task="classification", model="resnet18")
        filesystem, ray_root = store.ray_storage()
        for epoch in range(1, EPOCHS + 1):
            record.write_history(_history(run, epoch))
            local = tmp / f"run-{run}-{epoch}"
            local.mkdir(exist_ok=True)
            save_state(_state(run, epoch), local)
            pafs.copy_files(str(local), f"{ray_root}/run-{run}/checkpoint_{epoch:06d}",
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
        record.write_skipped([])
        record.write_results({"val/f1_deformation": EPOCHS / 10 + run / 100}, best_epoch=EPOCHS,
                             best_checkpoint=f"{ray_root}/run-{run}/checkpoint_{EPOCHS:06d}", epochs=EPOCHS)
        record.set_status("finished")
    finally:
        lease.release()


def _check_whole(store: ExperimentStore, run: int) -> None:
    """The run's records as written, and its best checkpoint loads with the weights of its last epoch."""
    record = store.existing_run(f"run-{run}")
    status = record.read_status()
    assert status["status"] == "finished" and status["name"] == f"run-{run}" and status["created"]
    assert record.read_config().name == f"run-{run}"
    assert record.read_history() == _history(run, EPOCHS)
    assert record.read_skipped() == []
    results = record.read_results()
    assert results["best_epoch"] == EPOCHS and results["metrics"] == {"val/f1_deformation": EPOCHS / 10 + run / 100}
    state = load_state(best_checkpoint(store, f"run-{run}"))
    assert state["progress"] == {"epoch": EPOCHS}
    torch.testing.assert_close(state["model"]["weight"], _state(run, EPOCHS)["model"]["weight"])


def test_a_store_in_a_throttling_bucket_loses_no_result(s3_bucket, moto_endpoint, tmp_path):
    runs = range(3)
    failures: list[str] = []
    with ProxyThread(int(moto_endpoint.rsplit(":", 1)[1]), FAULTS) as proxy:
        far = ExperimentStore.of(load_config(None, [f"storage.store={s3_bucket}/store",
                                                    f"storage.endpoint_url={proxy.url}"]).storage)
        for run in runs:
            try:
                _write_run(far, run, tmp_path)
            except (StorageError, OSError) as err:  # a clear failure: it names the store's location
                assert s3_bucket.removeprefix("s3://") in str(err), err
                failures.append(str(err))
                _write_run(far, run, tmp_path)  # the rerun of the same run id completes
        injected = proxy.stats()
        _check_whole(far, 0)  # read back through the faults too
    assert injected.slowdown > 0 and injected.reset > 0 and injected.stall > 0
    near = ExperimentStore(resolve(f"{s3_bucket}/store", S3Options.from_environment()))  # the bucket itself, no proxy
    for run in runs:
        _check_whole(near, run)
    assert sorted(s.run_id for s in near.list_runs()) == [f"run-{run}" for run in runs]
    assert len(failures) < len(runs), failures  # the retries carried most runs through


@pytest.mark.parametrize(("fault", "cause"), [("slowdown", "throttling requests"), ("reset", "unreachable")])
def test_a_store_write_that_never_gets_through_fails_naming_it_and_keeps_the_last_whole_record(
        s3_bucket, moto_endpoint, fault, cause):
    near = ExperimentStore(resolve(f"{s3_bucket}/store", S3Options.from_environment()))
    near.run("kept").write_history(_history(0, 2))
    with ProxyThread(int(moto_endpoint.rsplit(":", 1)[1]), Distance(**{fault: 1.0})) as proxy:
        far = ExperimentStore.of(load_config(
            None, [f"storage.store={s3_bucket}/store", f"storage.endpoint_url={proxy.url}", "storage.timeout_s=8"]).storage)
        with pytest.raises(StorageError, match=f"{s3_bucket.removeprefix('s3://')}/store/runs/kept/history.json") as err:
            far.run("kept").write_history(_history(0, 3))
    assert cause in str(err.value)  # what went wrong, not only that time ran out
    assert near.run("kept").read_history() == _history(0, 2)  # the old record, whole
