"""`thalia-ray pretrain` end to end on the session's Ray: a pretraining run is recorded as its own kind,
tracked and reported (with the MAE's reconstructions), its encoder is what `model.pretrained: run:<ID>`
loads for classification and segmentation (and keeps under linear probing), a killed pretraining resumes
from its last checkpoint, and a bad request fails in one line before Ray starts."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.helpers import check_resumed, tiny_train_config
from thalia_ray.config import load_config
from thalia_ray.data import schema

HEADS = {"coherence": 1.0, "dem": 0.5, "day_of_year": 0.5, "frame": 0.5}


@pytest.fixture(scope="module")
def pretraining_root(synthetic_root, tmp_path_factory):
    """The synthetic cubes without annotations or time-series index: pretraining must not need them."""
    root = tmp_path_factory.mktemp("unlabelled") / "thalia"
    shutil.copytree(synthetic_root, root)
    for name in (schema.ANNOTATIONS_FILE, schema.TIMESERIES_FILE):
        (root / name).unlink()
    return root


def _pretrain_config(tmp_path, root, store, model: str, method: str, epochs: int = 2, **sections):
    path = tiny_train_config(tmp_path / f"pretrain-{method}.yaml", root, store, model=model, epochs=epochs,
                             max_steps_per_epoch=2, sections={
                                 "data": {"crop": 32, "geomorphology": ["insar_difference"]},
                                 "pretrain": {"method": method, "heads": HEADS, "decoder_dim": 32, "projection_dim": 32},
                                 **sections})
    return path


def _loaded(path):
    cfg = load_config(path)
    return cfg.with_overrides({"name": f"pre-{cfg.pretrain.method}"})


@pytest.mark.slow
def test_pretraining_is_a_run_of_its_own_whose_encoder_fine_tunes(ray_cluster, pretraining_root, synthetic_root,
                                                                    tmp_path):
    from tests.helpers import assert_report_renders, assert_tracked
    from thalia_ray.pretrain.run import check, pretrain
    from thalia_ray.report.page import write_report
    from thalia_ray.report.pretrain import read_reconstructions
    from thalia_ray.store import ExperimentStore
    from thalia_ray.train.checkpoint import load_state
    from thalia_ray.models.pretrained import PretrainedWeightsError
    from thalia_ray.train.evaluate import best_checkpoint, load_model, model_from_config
    from thalia_ray.train.trainer import fit

    store_dir = tmp_path / "store"
    store = ExperimentStore(store_dir)
    mae = _loaded(_pretrain_config(tmp_path, pretraining_root, store_dir, "test_vit", "mae",
                                   runtime={"tracking": ["wandb", "tensorboard", "mlflow"], "wandb": {"mode": "offline"}}))
    result = pretrain(mae, store=store, run_id="mae", objective=check(mae, "mae"))
    record = store.run("mae")
    status, history = record.read_status(), record.read_history()
    assert (status["kind"], status["task"], status["status"]) == ("pretrain", "pretrain:mae", "finished")
    assert [h["epoch"] for h in history] == [1, 2] and result.best_epoch in (1, 2)
    assert {"train/loss_mae", "train/loss_coherence", "val/loss_mae", "val/loss_frame"} <= set(history[-1])
    assert_tracked(record, epochs=2)
    arrays = read_reconstructions(record)
    assert arrays is not None and arrays["phase"].shape == arrays["phase_reconstructed"].shape == arrays["mask"].shape
    hidden = arrays["mask"] > 0
    assert hidden.any() and np.allclose(arrays["phase"][~hidden], arrays["phase_reconstructed"][~hidden], atol=1e-5)
    assert {"coherence", "coherence_reconstructed", "dem"} <= set(arrays)
    report = write_report(store, "mae")
    page = report.read_text()
    assert "Masked-autoencoder reconstructions" in page and "Pretext tasks" in page and page.count("<img ") >= 2
    assert_report_renders(report, min_images=2)  # in headless Chromium, like every other run kind's page
    with pytest.raises(PretrainedWeightsError, match="a pretraining run's checkpoint: an encoder without a task head"):
        load_model(record.read_config(), best_checkpoint(store, "mae"))  # what evaluate, predict and export load

    # fine-tuning from it: the classifier's backbone holds exactly the run's encoder
    saved = load_state(best_checkpoint(store, "mae"))["encoder"]
    finetune = load_config(None, [f"data.root={synthetic_root}", f"storage.store={store_dir}", "data.crop=32",
                                  "data.geomorphology=[insar_difference]", "model.name=test_vit",
                                  "model.pretrained=run:mae"])
    backbone = model_from_config(finetune).backbone.state_dict()
    fresh = model_from_config(finetune.with_overrides({"model.pretrained": None})).backbone.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(backbone[key], tensor), key
    assert not torch.equal(fresh["pos_embed"], saved["pos_embed"])

    # a CNN pretraining run fine-tunes a classifier and a segmenter's encoder; linear probing keeps it
    simclr = _loaded(_pretrain_config(tmp_path, pretraining_root, store_dir, "test_resnet", "simclr", epochs=1))
    pretrain(simclr, store=store, run_id="simclr")
    encoder = load_state(best_checkpoint(store, "simclr"))["encoder"]
    segmenter = model_from_config(finetune.with_overrides({
        "model.task": "segmentation", "model.name": "unet", "model.encoder": "tu-test_resnet",
        "model.pretrained": "run:simclr"}))
    for key, tensor in encoder.items():
        assert torch.equal(segmenter.net.encoder.model.state_dict()[key], tensor), key
    probe = tiny_train_config(tmp_path / "probe.yaml", synthetic_root, store_dir, model="test_resnet",
                              sections={"data": {"crop": 32, "geomorphology": ["insar_difference"]},
                                        "model": {"name": "test_resnet", "pretrained": "run:simclr",
                                                  "linear_probe": True}})
    fit(load_config(probe), store=store, run_id="probe")
    probed = load_state(best_checkpoint(store, "probe"))["model"]
    for key, tensor in encoder.items():
        assert torch.equal(probed[f"backbone.{key}"], tensor), key  # frozen, statistics included


@pytest.mark.slow
def test_a_killed_pretraining_resumes_from_its_last_checkpoint(ray_cluster, pretraining_root, tmp_path):
    from tests.helpers import cli_driver, kill_after_checkpoint
    from thalia_ray.pretrain.run import pretrain
    from thalia_ray.store import ExperimentStore

    path = _pretrain_config(tmp_path, pretraining_root, tmp_path / "store", "test_resnet", "byol", epochs=4)
    store = ExperimentStore(tmp_path / "store")
    record = store.run("killed")
    log = tmp_path / "driver.log"
    with cli_driver(["pretrain", str(path), "--run-id", "killed"], log) as driver:
        kill_after_checkpoint(driver, store, "killed", log)
    assert record.read_status()["status"] == "running"  # nothing could record the kill
    done = len(record.read_history())
    assert 1 <= done < 4
    pretrain(_loaded(path), store=store, run_id="killed")
    check_resumed(record, epochs=4)
    assert record.read_status()["kind"] == "pretrain"


@pytest.mark.slow
def test_a_signal_stops_a_pretraining_at_a_safe_point_and_the_rerun_trains_each_epoch_once(
        ray_cluster, pretraining_root, tmp_path, monkeypatch):
    """Ctrl-C during a pretraining run: it ends after the checkpoint being written, marked interrupted with the
    way to resume, and the rerun trains only the epochs left (the same `fit` and stop handling as training)."""
    from thalia_ray import interrupts
    from thalia_ray.interrupts import SIGNAL_AT_ENV, Interrupted
    from thalia_ray.pretrain.run import pretrain
    from thalia_ray.store import ExperimentStore

    cfg = _loaded(_pretrain_config(tmp_path, pretraining_root, tmp_path / "store", "test_resnet", "simclr", epochs=3))
    store = ExperimentStore(tmp_path / "store")
    record = store.run("sig")
    monkeypatch.setenv(SIGNAL_AT_ENV, "SIGINT:after-checkpoint:1")
    with interrupts.handling(), pytest.raises(Interrupted) as stopped:
        pretrain(cfg, store=store, run_id="sig")
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == ("run sig interrupted by SIGINT after epoch 1 of 3: epoch 1 is checkpointed; rerun "
                                  "the same command with --run-id sig to resume from epoch 2")
    assert record.read_status()["status"] == "interrupted" and [h["epoch"] for h in record.read_history()] == [1]
    monkeypatch.delenv(SIGNAL_AT_ENV)
    with interrupts.handling():
        pretrain(cfg, store=store, run_id="sig")
    assert [(h["epoch"], h["restarts"]) for h in record.read_history()] == [(1, 0), (2, 1), (3, 1)]
    assert record.read_status()["status"] == "finished" and record.read_status()["kind"] == "pretrain"


def test_pretraining_requests_that_cannot_work_fail_before_ray(synthetic_root, tmp_path):
    from tests.helpers import cli

    path = _pretrain_config(tmp_path, synthetic_root, tmp_path / "store", "resnet18", "mae")
    mae_on_cnn = cli(["pretrain", str(path)])
    assert mae_on_cnn.returncode == 2 and "pretrain.method 'mae' needs a ViT backbone" in mae_on_cnn.stderr
    located = cli(["pretrain", str(path), "--set", "pretrain.method=simclr", "--set",
                   "pretrain.heads={location: 1.0}"])
    assert located.returncode == 2 and "pretrain.heads.location: none of the frames" in located.stderr
    missing = cli(["pretrain", str(path), "--set", f"data.root={tmp_path / 'nowhere'}"])
    assert missing.returncode == 3 and "data.root" in missing.stderr
    bad_store = cli(["pretrain", str(path), "--set", "pretrain.method=simclr", "--set", f"storage.store={path}"])
    assert bad_store.returncode == 7 and "is a file, not a folder" in bad_store.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_a_sweep_may_range_over_pretraining_runs():
    from tests.helpers import REPO
    from thalia_ray.jobs import load_spec
    from thalia_ray.tune.space import param_space

    space = "{model.pretrained: {grid: [run:pre-a, run:pre-b, null]}, model.linear_probe: {grid: [false, true]}}"
    spec = load_spec(REPO / "jobs" / "finetune-sweep.yaml", [f"sweep.space={space}"])
    assert param_space(spec.config.sweep)["model.pretrained"]["grid_search"] == ["run:pre-a", "run:pre-b", None]
    pretraining = load_spec(REPO / "jobs" / "pretrain-mae.yaml")
    assert pretraining.run_id and pretraining.entrypoint_args[-2:] == ("--run-id", pretraining.run_id)
    assert pretraining.config.pretrain.splits == ["train"]  # the example keeps val/test unseen
