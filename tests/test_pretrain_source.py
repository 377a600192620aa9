"""Pretraining's source and the label fraction, without Ray: what pretraining may read (every pair the
cubes hold in the allowed periods; never an annotation), its held-out groups, and the nested, stratified
label subsets of the label-efficiency study."""
from __future__ import annotations

import shutil
from datetime import date
from types import SimpleNamespace

import pytest

from thalia_ray.config import ConfigError, load_config
from thalia_ray.data import schema
from thalia_ray.data.index import epoch_draw, labelled_subset
from thalia_ray.data.pairs import existing_pairs, frame_ids
from thalia_ray.pretrain.source import HOLDOUT, TRAIN, PretrainSource, holdout_groups

TRAIN_END = schema.SPLITS["train"][1]


@pytest.fixture()
def unlabelled_root(synthetic_root, tmp_path):
    """The synthetic dataset without its annotations and time-series index: cubes and statistics only."""
    root = tmp_path / "unlabelled"
    shutil.copytree(synthetic_root, root)
    for name in (schema.ANNOTATIONS_FILE, schema.TIMESERIES_FILE):
        (root / name).unlink()
    return root


def _day(value: str) -> date:
    return date(int(value[:4]), int(value[4:6]), int(value[6:]))


def test_by_default_pretraining_sees_only_the_training_period_and_no_annotation(unlabelled_root):
    cfg = load_config(None, [f"data.root={unlabelled_root}", "data.geomorphology=[insar_difference]",
                             "pretrain.heads={coherence: 1.0, day_of_year: 1.0}"])
    source = PretrainSource.open(cfg)  # would fail if it needed the annotations: they are gone
    planned = [s for pool in source.pools.values() for s in pool]
    assert planned and all(_day(s.primary_date) <= TRAIN_END for s in planned)
    assert {s.period for s in planned} == {"train"}
    cubes = {f: existing_pairs(source_cube) for f, source_cube in _cubes(source)}
    later = [p for pairs in cubes.values() for p in pairs if _day(p) > TRAIN_END]
    assert later, "the fixture's cubes hold val/test pairs: the default must be what leaves them out"
    rows = list(source.for_items(planned[:3]).read(planned[:3], lambda key: None))
    record = source.record(rows[0], TRAIN, None, None, True)
    assert not {"label", "mask", "aux_intensity", "aux_activity_type", "confidence"} & set(record)
    assert set(record) >= {"image", "target_insar_coherence", "day_of_year", "frame", "position", "has_position"}


def _cubes(source: PretrainSource):
    from thalia_ray.data.cube import get_cache

    return [(frame, get_cache(source.root).get(frame)) for frame in source.frames]


def test_allowing_every_period_plans_every_pair_the_cubes_hold(unlabelled_root):
    every = PretrainSource.open(load_config(None, [f"data.root={unlabelled_root}",
                                                   "pretrain.splits=[train, val, test]"]))
    planned = {(s.frame_id, s.primary_date, s.secondary_dates[0]) for pool in every.pools.values() for s in pool}
    held = {(f, p, s) for f, cube in _cubes(every) for p, secondaries in existing_pairs(cube).items() for s in secondaries}
    assert planned == held
    assert {s.period for pool in every.pools.values() for s in pool} == {"train", "val", "test"}
    assert sorted(every.frames) == frame_ids(unlabelled_root)


def test_held_out_groups_are_whole_and_never_trained_on(synthetic_root):
    source = PretrainSource.open(load_config(None, [f"data.root={synthetic_root}", "data.length=2",
                                                    "pretrain.holdout=0.2"]))
    train_groups = {s.group for s in source.pools[TRAIN]}
    held = {s.group for s in source.pools[HOLDOUT]}
    assert held and train_groups and not train_groups & held
    assert len(held) == pytest.approx(0.2 * (len(held) + len(train_groups)), abs=1)
    assert source.epoch_items(HOLDOUT, 3) == source.pools[HOLDOUT]  # fixed order for validation
    first, second = source.epoch_items(TRAIN, 0), source.epoch_items(TRAIN, 1)
    assert sorted(s.key for s in first) == sorted(s.key for s in second) and first != second  # reshuffled


def test_holdout_takes_at_least_one_group():
    series = [SimpleNamespace(group=f"g{i}") for i in range(3)]
    assert len(holdout_groups(series, 0.01, seed=0)) == 1


def test_a_pretext_target_may_not_be_an_input_channel():
    with pytest.raises(ConfigError, match=r"pretrain.heads.coherence predicts \['insar_coherence'\]"):
        load_config(None, ["pretrain.heads={coherence: 1.0}"])  # the default channels include coherence
    load_config(None, ["pretrain.heads={coherence: 1.0}", "data.geomorphology=[insar_difference, dem]"])
    with pytest.raises(ConfigError, match="method 'none' needs at least one pretext head"):
        load_config(None, ["pretrain.method=none"])


# ------------------------------------------------------------------------------ label fraction
def _items(positives: int, negatives: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(key=f"s{i}", label=int(i < positives)) for i in range(positives + negatives)]


def test_label_fraction_keeps_each_class_nested_and_fixed_per_seed():
    pool = _items(20, 80)
    small, medium, whole = (labelled_subset(pool, f, seed=3) for f in (0.05, 0.2, 1.0))
    assert [sum(i.label for i in s) for s in (small, medium, whole)] == [1, 4, 20]
    assert [len(s) for s in (small, medium, whole)] == [5, 20, 100]
    assert {i.key for i in small} <= {i.key for i in medium} <= {i.key for i in whole}
    assert labelled_subset(pool, 0.2, seed=3) == medium
    assert {i.key for i in labelled_subset(pool, 0.2, seed=4)} != {i.key for i in medium}
    assert len(labelled_subset(_items(1, 3), 0.05, seed=0)) == 2  # a class keeps at least one


def test_every_epoch_draws_from_the_same_labelled_subset():
    pool = _items(20, 80)
    kept = {i.key for i in labelled_subset(pool, 0.2, seed=1)}
    for epoch in range(3):
        drawn = epoch_draw(pool, "train", epoch, seed=1, plan="equal", label_fraction=0.2)
        assert {i.key for i in drawn} <= kept and sum(i.label for i in drawn) == 4 and len(drawn) == 8
    assert len(epoch_draw(pool, "val", 0, seed=1, plan="equal", label_fraction=0.2)) == 100  # val/test untouched
