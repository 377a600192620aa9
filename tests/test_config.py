"""Configuration: defaults, YAML, dotted overrides and errors that name the field, the value and what is allowed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from thalia_ray.config import ConfigError, ThaliaConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_a_runnable_local_config():
    cfg = load_config()
    assert cfg.model.task == "classification" and cfg.model.name == "resnet18"
    assert cfg.data.channels == ["insar_difference", "insar_coherence", "dem"]
    assert cfg.storage.store == "./runs"
    assert str(cfg.data.splits["val"].start) == "2019-06-01"


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["train.lr=3e-4", "model.name=resnet50", "data.atmospheric=[surface_pressure]",
                                 "train.grad_clip=null"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.name == "resnet50"
    assert cfg.train.grad_clip is None
    # the ERA5 variable contributes its primary and secondary channel, in that order
    assert cfg.data.channels[-2:] == ["primary_date_surface_pressure", "secondary_date_surface_pressure"]


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"task": "segmentation"}, "train": {"epochs": 7}}))
    cfg = load_config(path, ["train.epochs=9"])
    assert cfg.model.name == "unet"  # the segmentation default
    assert cfg.train.epochs == 9


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", ["train.lrr", "unknown field", "allowed:", "lr,"]),
        ("train.lr=abc", ["train.lr", "valid number", "'abc'"]),
        ("data.policy=shuffle", ["data.policy", "'enumerate' or 'resample'", "'shuffle'"]),
        ("data.length=0", ["data.length", "greater than or equal to 1", "0"]),
        ("model.name=resnet9000", ["model.name", "resnet9000", "resnet18"]),
        ("data.geomorphology=[dem, dem]", ["data.geomorphology", "twice"]),
        ("data.source=parquet", ["data.source", "'cube', 'shards' or 'published'", "'parquet'"]),
        ("data.shard_format=published", ["data.shard_format", "data.source: published"]),
        ("bogus.section=1", ["bogus", "unknown field", "data"]),
    ],
)
def test_errors_name_field_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    for fragment in expected:
        assert fragment in str(info.value)


def test_segmentation_model_on_classification_task_is_refused():
    with pytest.raises(ConfigError, match="not available for classification"):
        load_config(overrides=["model.name=unet"])


def test_sweep_space_is_checked_against_the_run_config():
    good = load_config(overrides=['sweep={"space": {"model.name": {"grid": [resnet18, mobilenetv3_small]}}}'])
    assert good.sweep.space["model.name"].grid == ["resnet18", "mobilenetv3_small"]
    with pytest.raises(ConfigError, match=r"sweep.space\['train.lr'\] value 5"):
        load_config(overrides=['sweep={"space": {"train.lr": {"grid": [0.001, 5]}}}'])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(overrides=['sweep={"space": {"train.lr": {"grid": [0.1], "uniform": [0.1, 0.2]}}}'])


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_round_trip_through_stored_yaml():
    cfg = load_config(overrides=["train.epochs=5", "data.length=3"])
    again = ThaliaConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.with_overrides({"train.lr": 1e-5}).train.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_example_configs_validate(path):
    load_config(path)


def test_cli_reports_bad_field_before_any_work():
    proc = subprocess.run([sys.executable, "-m", "thalia_ray.cli", "train", "--set", "train.epochs=-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr and "-1" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    shown = subprocess.run([sys.executable, "-m", "thalia_ray.cli", "config", "show", "--set", "train.lr=3e-4"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "lr: 0.0003" in shown.stdout


def test_eval_label_rule_labels_val_and_test_like_the_reference():
    from thalia_ray.data import schema
    from thalia_ray.data.cube import RawSample
    from thalia_ray.data.transforms import finalize

    cfg = load_config(overrides=["data.label_rule=last", "data.eval_label_rule=union", "data.normalize=false",
                                 "data.augmentations=false"])
    assert [cfg.data.label_rule_for(s) for s in ("train", "val", "test")] == ["last", "union", "union"]
    assert load_config(overrides=["data.label_rule=last"]).data.label_rule_for("test") == "last"
    meta = {"frame_id": "128D_x", "member_positive": [True, False], "confidence": 1.0, "phase": "Rest",
            "activity_types": [[], []], "intensity_levels": [[], []],
            "flags": [dict.fromkeys(schema.FLAGS, 0)] * 2}
    raw = RawSample(image=np.zeros((2, 3, 8, 8), np.float32), mask=np.zeros((2, 8, 8), np.uint8), key="k", meta=meta)
    # The last member is negative: a training sample is negative, the same series in val/test positive.
    assert finalize(raw, cfg.data, None, np.random.default_rng(0), training=True)["label"] == 0
    assert finalize(raw, cfg.data, None, None, training=False)["label"] == 1
