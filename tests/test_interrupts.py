"""Ctrl-C and SIGTERM: a first signal stops work at a safe point, a second at once; a run, a sweep, predict and
export end cleanly, and a rerun resumes from the last checkpoint, training no epoch twice.

The signals are sent by the fault hook (`interrupts.SignalAt`: the loop signals the driver at a named point
and waits until the request has arrived), never after a sleep, so where a run stops is deterministic.
Runs interrupted here are drivers in this process, as the CLI's are (its one line and exit status are
checked through a real `thalia-ray train` process).
"""
from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from thalia_ray import interrupts
from thalia_ray.config import ThaliaConfig
from thalia_ray.interrupts import SIGNAL_AT_ENV, Interrupted, SignalAt

EPOCHS = 3


# ------------------------------------------------------------------------------------- pure parts
def test_a_first_signal_asks_claimed_work_to_stop_and_a_second_stops_it_at_once(capsys):
    with interrupts.handling() as stop:
        with stop.graceful("run r1"):
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.requested_signal() == "SIGINT" and stop.reason.startswith("SIGINT at ")
            assert capsys.readouterr().err == ("thalia-ray: SIGINT: run r1 stops at its next safe point; "
                                               "send it again to stop at once\n")
            with pytest.raises(Interrupted, match="interrupted by SIGTERM: run r1 stopped at once") as again:
                os.kill(os.getpid(), signal.SIGTERM)
            assert again.value.exit_code == 128 + signal.SIGTERM
    assert interrupts.current() is not stop and not interrupts.current().requested  # each command its own


def test_unclaimed_work_stops_at_the_first_signal_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with interrupts.handling(), pytest.raises(Interrupted, match="^interrupted by SIGINT$") as stopped:
        os.kill(os.getpid(), signal.SIGINT)
    assert stopped.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is before


def test_run_aside_keeps_the_main_thread_for_signals_and_passes_results_and_errors_back():
    stop = interrupts.Stop()
    assert stop.run_aside(lambda: threading.current_thread().name, "aside") == "aside"
    with pytest.raises(ZeroDivisionError):
        stop.run_aside(lambda: 1 / 0, "aside")
    seen: list[str] = []
    called = threading.Event()
    with stop.watch(lambda reason: (seen.append(reason), called.set())):
        stop.request(signal.SIGTERM)
        assert called.wait(5)  # the run is marked at once, not when it ends
    assert len(seen) == 1 and seen[0].startswith("SIGTERM at ")


def test_the_fault_hook_names_its_signal_point_and_count(monkeypatch):
    assert SignalAt.parse("SIGTERM:during-checkpoint:2") == SignalAt(signal.SIGTERM, "during-checkpoint", 2)
    with pytest.raises(ValueError, match="point 'midway' is not one of"):
        SignalAt.parse("SIGINT:midway:1")
    monkeypatch.setenv(SIGNAL_AT_ENV, "SIGINT:after-unit:2")
    with interrupts.handling() as stop, stop.graceful("export"):
        assert stop.signal_at is not None and not stop.signal_at.fire("after-unit", 1, stop)
        assert stop.signal_at.fire("after-unit", 2, stop) and stop.requested  # sent, and arrived
        assert not stop.signal_at.fire("after-unit", 2, stop)  # once


# ------------------------------------------------------------------------------------------ runs
def _config(root, store, workers: int = 1, epochs: int = EPOCHS, **sections) -> ThaliaConfig:
    return ThaliaConfig.model_validate({
        "name": "sig", "data": {"root": str(root), "crop": 32, "samples_per_read_task": 32},
        "model": {"name": "mobilenetv3_small"},
        "train": {"epochs": epochs, "batch_size": 4, "num_workers": workers, "cpus_per_worker": 0.5,
                  "max_steps_per_epoch": 2, "max_failures": 0, "test_best": False},
        "storage": {"store": str(store)}, "runtime": {"wandb": {"mode": "disabled"}}, **sections,
    })


def _ray_checkpoint_epochs(store, run_id: str) -> tuple[list[int], int | None]:
    """The epochs of the checkpoints Ray Train registered (its snapshot, which a rerun resumes from), and
    the latest one's."""
    from thalia_ray.ray_internals import TRAIN_SNAPSHOT as RAY_SNAPSHOT

    path = store.ray_root.join(run_id, RAY_SNAPSHOT)
    if not path.exists():
        return [], None
    snapshot = json.loads(path.read_text())
    latest = snapshot.get("latest_checkpoint_result")
    return (sorted(int(r["metrics"]["epoch"]) for r in snapshot["checkpoint_results"]),
            int(latest["metrics"]["epoch"]) if latest else None)


# (signal, point, epoch it fires in, epochs the interrupted run keeps, workers)
POINTS = [
    ("SIGINT", "during-epoch", 2, 1, 2),  # the epoch in training is abandoned; two ranks leave together
    ("SIGINT", "before-checkpoint", 2, 2, 1),  # a validated epoch is checkpointed before the run stops
    ("SIGTERM", "during-checkpoint", 1, 1, 1),  # the checkpoint being written is finished and registered
    ("SIGINT", "after-checkpoint", 2, 2, 1),  # registered at once: the next epoch does not start
]


@pytest.mark.slow
@pytest.mark.parametrize("name,point,at,kept,workers", POINTS, ids=[f"{p[0]}-{p[1]}" for p in POINTS])
def test_a_signal_stops_a_run_at_a_safe_point_and_the_rerun_trains_each_epoch_once(
        ray_cluster, synthetic_root, tmp_path, monkeypatch, name, point, at, kept, workers):
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.trainer import fit

    cfg = _config(synthetic_root, tmp_path / "store", workers)
    store = ExperimentStore.of(cfg.storage)
    record = store.run("sig")
    monkeypatch.setenv(SIGNAL_AT_ENV, f"{name}:{point}:{at}")
    with interrupts.handling(), pytest.raises(Interrupted) as stopped:
        fit(cfg, store=store, run_id="sig")
    assert stopped.value.exit_code == 128 + signal.Signals[name]
    hint = "epoch 1 is checkpointed" if kept == 1 else f"epochs 1-{kept} are checkpointed"
    assert str(stopped.value) == (f"run sig interrupted by {name} after epoch {kept} of {EPOCHS}: {hint}; rerun the "
                                  f"same command with --run-id sig to resume from epoch {kept + 1}")
    status = record.read_status()
    assert status["status"] == "interrupted" and status["error"] == str(stopped.value)
    # The store's record of the epochs and Ray Train's snapshot agree: the rerun resumes after the last one.
    assert [h["epoch"] for h in record.read_history()] == list(range(1, kept + 1))
    registered, latest = _ray_checkpoint_epochs(store, "sig")
    assert latest == kept and registered[-1] == kept

    monkeypatch.delenv(SIGNAL_AT_ENV)
    with interrupts.handling():
        result = fit(cfg, store=store, run_id="sig")
    history = record.read_history()
    assert [(h["epoch"], h["restarts"]) for h in history] == [
        *((e, 0) for e in range(1, kept + 1)), *((e, 1) for e in range(kept + 1, EPOCHS + 1))]
    assert record.read_status()["status"] == "finished" and record.read_results()["restarts"] == 1
    assert result.history == history and _ray_checkpoint_epochs(store, "sig")[1] == EPOCHS


@pytest.mark.slow
def test_the_cli_ends_an_interrupted_run_with_one_line_and_the_signals_status(synthetic_root, tmp_path):
    """A real `thalia-ray train` process: SIGTERM (what `ray job stop` and Kubernetes send) after the first
    checkpoint ends it with status 143, one line saying how to resume, and no traceback."""
    from tests.helpers import cli

    (tmp_path / "run.yaml").write_text(_config(synthetic_root, tmp_path / "store").with_overrides(
        {"train.epochs": 2, "runtime.num_cpus": 2, "runtime.object_store_memory": 100_000_000}).to_yaml())
    done = cli(["train", str(tmp_path / "run.yaml"), "--run-id", "cli"], env={SIGNAL_AT_ENV: "SIGTERM:after-checkpoint:1"},
               timeout=600)
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        "thalia-ray: run cli interrupted by SIGTERM after epoch 1 of 2: epoch 1 is checkpointed; rerun the same "
        "command with --run-id cli to resume from epoch 2")
    assert "Traceback" not in done.stderr and done.stdout == ""
    status = json.loads((tmp_path / "store" / "runs" / "cli" / "run.json").read_text())
    assert status["status"] == "interrupted"


# ---------------------------------------------------------------------------------------- sweeps
@pytest.mark.slow
def test_a_signal_stops_a_sweep_whose_resume_trains_each_epoch_once(ray_cluster, synthetic_root, tmp_path,
                                                                    monkeypatch):
    """The running trial stops at a checkpoint and waits; Tune saves its state with the trial unfinished and
    the next one not started; `--resume` finishes both, the first from its checkpoint."""
    from thalia_ray.store import ExperimentStore
    from thalia_ray.tune.driver import run_sweep

    cfg = _config(synthetic_root, tmp_path / "store", epochs=2, sweep={
        "name": "t", "search": "grid", "scheduler": "fifo", "metric": "val/loss", "mode": "min",
        "max_concurrent_trials": 1, "space": {"train.lr": {"grid": [3e-3, 1e-3]}}})
    monkeypatch.setenv(SIGNAL_AT_ENV, "SIGINT:after-checkpoint:1")
    with interrupts.handling(), pytest.raises(Interrupted) as stopped:
        run_sweep(cfg, sweep_id="sw")
    assert stopped.value.exit_code == 130
    assert str(stopped.value).startswith("sweep sw interrupted by SIGINT: 1 trial(s) stopped at a checkpoint, "
                                         "0 finished; rerun with --sweep-id sw --resume")
    store = ExperimentStore.of(cfg.storage)
    runs = store.list_runs(sweep="sw")
    assert [(r.status, len(store.run(r.run_id).read_history())) for r in runs] == [("interrupted", 1)]
    assert store.sweep("sw").read_summary()["status"] == "interrupted"

    monkeypatch.delenv(SIGNAL_AT_ENV)
    with interrupts.handling():
        summary = run_sweep(cfg, resume=True, sweep_id="sw")
    assert summary.status == "finished" and len(summary.trials) == 2
    histories = {r.run_id: store.run(r.run_id).read_history() for r in store.list_runs(sweep="sw")}
    assert sorted([h["epoch"] for h in history] for history in histories.values()) == [[1, 2], [1, 2]]
    first = histories[runs[0].run_id]
    assert [h["restarts"] for h in first] == [0, 1]  # resumed after its checkpoint, not trained again
