"""Annotation validation, time-series index, splits, padding, enumeration, balanced epochs and the
counts of the real Thalia metadata."""
from __future__ import annotations

import gzip
import itertools
import json
from collections import Counter

import numpy as np
import pytest

from thalia_ray.config import DataConfig
from thalia_ray.data.annotations import (
    AnnotationError,
    AnnotationSet,
    describe_left_out,
    find_metadata,
    load_annotations,
    load_timeseries,
    parse_annotation,
    validate_timeseries,
)
from thalia_ray.data.index import (
    SampleIndex,
    enumerate_subsets,
    group_rng,
    index_counts,
    pad_positions,
)

from tests.helpers import FRAME, record

OTHER = "128D_09016_110500"


def dataset(groups: dict[str, dict[str, list[tuple[str, bool]]]]) -> tuple[dict, dict]:
    """Annotation records and a time-series index from `{frame: {primary: [(secondary, positive)]}}`."""
    records, timeseries, uid = {}, {}, 1
    for frame, frame_groups in groups.items():
        timeseries[frame] = {}
        for primary, members in frame_groups.items():
            ids = []
            for secondary, positive in members:
                records[str(uid)] = record(uid, primary, secondary, positive, frame=frame)
                ids.append(uid)
                uid += 1
            timeseries[frame][primary] = {"length": len(ids), "secondary_date": [s for s, _ in members],
                                          "uniqueID": ids}
    return records, timeseries


def write(root, records, timeseries, gz=False):
    root.mkdir(parents=True, exist_ok=True)
    data = json.dumps(records).encode()
    if gz:
        (root / "annotations.json.gz").write_bytes(gzip.compress(data))
    else:
        (root / "annotations.json").write_bytes(data)
    (root / "quality_timeseries.json").write_text(json.dumps(timeseries))


def series(primary: str, n: int, positive_at: tuple[int, ...] = ()) -> list[tuple[str, bool]]:
    year, month = int(primary[:4]), int(primary[4:6])
    return [(f"{year + 1}{month:02d}{i + 1:02d}", i in positive_at) for i in range(n)]


def build(groups, seed=0, **cfg) -> SampleIndex:
    records, timeseries = dataset(groups)
    anns = load_annotations_from(records)
    return SampleIndex.build(anns, validate_timeseries(timeseries), DataConfig(**cfg), seed)


def load_annotations_from(records):
    return AnnotationSet({int(k): parse_annotation(k, v) for k, v in records.items()})


# ---------------------------------------------------------------------------- annotations
BAD_FIELDS = [
    ("uniqueID", 1.5), ("uniqueID", True), ("primary_date", "2019-01-01"), ("secondary_date", "20190230"),
    ("label", []), ("label", ["Volcano"]), ("activity_type", "Sill"), ("intensity_level", ["Huge"]),
    ("phase", "Sleeping"), ("confidence", 1.5), ("confidence", "high"), ("corrupted", 2),
    ("atmospheric_fringes", 4), ("low_coherence", True), ("segmentation_mask", [[1.0, 2.0, 3.0]]),
    ("segmentation_mask", [[1.0, "a"]]), ("caption", None), ("frameID", 7),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_malformed_annotation_is_reported_with_uid_and_field(tmp_path, field, value):
    records = {"1": record(1, "20190101", "20190113", False), "2": record(2, "20190101", "20190125", True)}
    records["2"][field] = value
    write(tmp_path, records, {})
    skipped = load_annotations(tmp_path / "annotations.json", on_malformed="skip")
    assert list(skipped) == [1]
    assert len(skipped.problems) == 1 and "uniqueID 2" in skipped.problems[0] and repr(field) in skipped.problems[0]
    with pytest.raises(AnnotationError, match=rf"uniqueID 2: field '{field}'"):
        load_annotations(tmp_path / "annotations.json", on_malformed="fail")


def test_annotation_fields_parsed_from_gzip_and_per_sample_folder(tmp_path):
    raw = record(7, "20190101", "20190113", True, polygons=[(1, 2, 3, 4, 5, 6)], atmospheric_fringes=3,
                 processing_error=2, uniqueID="7")
    write(tmp_path / "gz", {"7": raw}, {}, gz=True)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "7.json").write_text(json.dumps(raw))
    for location in (tmp_path / "gz" / "annotations.json.gz", tmp_path / "folder"):
        ann = load_annotations(str(location))[7]
        assert ann.positive and ann.labels == ("Deformation",) and ann.polygons == ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0),)
        assert ann.flags["atmospheric_fringes"] == 3 and ann.flags["processing_error"] == 2
    mismatch = {"8": record(9, "20190101", "20190113", False)}
    write(tmp_path / "mm", mismatch, {})
    assert "does not match its key" in load_annotations(tmp_path / "mm" / "annotations.json").problems[0]


def test_timeseries_validation_and_members_without_annotation(tmp_path):
    with pytest.raises(AnnotationError, match=r"\[F\]\[20190101\].*equal length"):
        validate_timeseries({"F": {"20190101": {"length": 2, "secondary_date": ["20190113"], "uniqueID": [1, 2]}}})
    with pytest.raises(AnnotationError, match=r"\[F\]\[2019-01-01\]"):
        validate_timeseries({"F": {"2019-01-01": {"secondary_date": [], "uniqueID": []}}})
    records, timeseries = dataset({FRAME: {"20180101": series("20180101", 3)}})
    records["2"]["confidence"] = -1  # malformed → skipped, so its series member goes too
    timeseries[FRAME]["20180101"]["uniqueID"].append(99)  # no such annotation
    timeseries[FRAME]["20180101"]["secondary_date"].append("20190110")
    timeseries[FRAME]["20180101"]["length"] = 4
    write(tmp_path, records, timeseries)
    index = SampleIndex.from_config(DataConfig(root=str(tmp_path), length=1), seed=0)
    assert [s.unique_ids for s in index.samples("train")] == [(1,), (3,)]
    assert any("uniqueID 2" in p and "confidence" in p for p in index.problems)
    assert any("uniqueID 99" in p and "member skipped" in p for p in index.problems)
    with pytest.raises(AnnotationError, match="no annotations"):
        find_metadata(tmp_path / "empty")


# -------------------------------------------------------------------------------- splits
def test_split_boundaries_are_inclusive_by_primary_date():
    groups = {FRAME: {d: series(d, 1) for d in
                      ["20131231", "20140101", "20190531", "20190601", "20191231", "20200101", "20211231", "20220101"]}}
    index = build(groups)
    by_split = {s: [x.primary_date for x in index.samples(s)] for s in ("train", "val", "test")}
    assert by_split == {"train": ["20140101", "20190531"], "val": ["20190601", "20191231"],
                        "test": ["20200101", "20211231"]}
    custom = build(groups, splits={"train": {"start": "2019-06-01", "end": "2019-12-31"}})
    assert [x.primary_date for x in custom.samples("train")] == ["20190601", "20191231"]


# ----------------------------------------------------------------------- series building
def test_padding_duplicates_in_place_deterministically():
    for n, length in [(1, 4), (2, 4), (3, 7)]:
        positions = pad_positions(n, length, group_rng(0, "g"))
        assert len(positions) == length and sorted(positions) == list(positions) and set(positions) == set(range(n))
    groups = {FRAME: {"20180101": series("20180101", 2, (1,)), "20180301": series("20180301", 3)}}
    first, again = build(groups, length=5), build(groups, length=5)
    assert [s.key for s in first.samples("train")] == [s.key for s in again.samples("train")]
    padded = first.samples("train")[0]
    assert len(padded.secondary_dates) == 5 and list(padded.secondary_dates) == sorted(padded.secondary_dates)
    assert padded.member_positive == tuple(uid == 2 for uid in padded.unique_ids) and padded.label == 1
    assert "." not in padded.key and padded.key.startswith(f"{FRAME}-20180101-")
    seeds = {tuple(build(groups, seed=s, length=5).samples("train")[0].unique_ids) for s in range(8)}
    assert len(seeds) > 1  # the seed decides which members are duplicated


def reference_enumeration(n, length, min_distinct):
    """The published procedure, literally (sets and list filtering)."""
    combos, kept = list(itertools.combinations(range(n), length)), []
    while combos:
        current = combos.pop(0)
        kept.append(current)
        combos = [c for c in combos if len(set(current) & set(c)) < min_distinct]
    return kept


@pytest.mark.parametrize("n,length,md", [(5, 2, 1), (6, 3, 1), (6, 3, 2), (8, 4, 3), (8, 4, 2), (7, 2, 0), (9, 3, 2)])
def test_enumeration_matches_published_procedure(n, length, md):
    assert list(enumerate_subsets(n, length, md)) == reference_enumeration(n, length, md)


def test_min_distinct_differs_between_train_and_val():
    def counts(primary, positive_at, length):
        index = build({FRAME: {primary: series(primary, 6, positive_at)}}, length=length)
        split = "train" if primary < "20190601" else "val"
        return len(index.samples(split))

    # Val/test: min_distinct 1 → disjoint subsets.
    assert counts("20190701", (), 3) == counts("20190701", (2,), 3) == 2
    # Train: T-1 when the whole group holds a positive (more subsets), T-2 when it does not.
    assert counts("20180101", (2,), 3) == len(reference_enumeration(6, 3, 2)) > 2
    assert counts("20180101", (), 3) == len(reference_enumeration(6, 3, 1)) == 2
    assert counts("20180101", (), 2) == 1  # min_distinct 0: only the first pair survives
    # T = 1: every member is its own sample; a positive subset is positive if any member is.
    assert counts("20180101", (), 1) == 6
    index = build({FRAME: {"20180101": series("20180101", 6, (5,))}}, length=3)
    for sample in index.samples("train"):
        assert sample.label == int(6 in sample.unique_ids)
    last = build({FRAME: {"20180101": series("20180101", 3, (0,))}}, length=3, label_rule="last")
    assert [s.label for s in last.samples("train")] == [0]


def test_frames_restriction_and_counts():
    groups = {FRAME: {"20180101": series("20180101", 2, (0,))}, OTHER: {"20180101": series("20180101", 3)}}
    only = build(groups, frames=[OTHER])
    assert {s.frame_id for s in only.samples("train")} == {OTHER}
    assert build(groups).counts()["train"] == {"samples": 5, "positives": 1, "negatives": 4}


# --------------------------------------------------------------------------- epochs
def many_groups():
    frames = {}
    for f, frame in enumerate([FRAME, OTHER]):
        frames[frame] = {f"2018{m:02d}01": series(f"2018{m:02d}01", 1, (0,) if (m + f) % 4 == 0 else ())
                         for m in range(1, 13)}
        frames[frame].update({f"2019{m:02d}01": series(f"2019{m:02d}01", 1) for m in range(7, 12)})
    return frames


def test_balanced_epochs():
    index = build(many_groups())
    pool = index.samples("train")
    positives = {s.key for s in pool if s.label}
    assert 0 < len(positives) < len(pool) / 2
    epochs = [index.epoch("train", e, seed=3) for e in range(4)]
    negative_sets = []
    for samples in epochs:
        keys = [s.key for s in samples]
        assert len(keys) == len(set(keys)) == 2 * len(positives)
        assert positives <= set(keys)
        negative_sets.append(frozenset(keys) - positives)
    assert len(set(negative_sets)) > 1  # fresh negatives each epoch
    assert [s.key for s in index.epoch("train", 2, seed=3)] == [s.key for s in epochs[2]]
    assert [s.key for s in index.epoch("train", 2, seed=4)] != [s.key for s in epochs[2]]
    assert index.epoch("val", 5) == index.epoch("val", 0) == index.samples("val")
    unbalanced = build(many_groups(), balance=False)
    assert len(unbalanced.epoch("train", 1)) == len(pool)


def reference_random_samples(sources, draws):
    """The reference's `random_samples(sources, probs=[1, 1], longest=False)` (utilities/utils.py), its
    `random.random()` replaced by `next(draws)`: the stream whose cumulative share first reaches the draw
    yields the next sample, and the mix ends at the first draw that meets an exhausted stream."""
    probs = [1, 1]
    while len(sources) > 0:
        cum = (np.array(probs) / np.sum(probs)).cumsum()
        i = np.searchsorted(cum, next(draws))
        try:
            yield next(sources[i])
        except StopIteration:
            break


def test_random_mix_epochs_end_as_the_references_and_hold_every_positive():
    index = build(many_groups(), balance_plan="random_mix")
    pool = index.samples("train")
    positives = [s for s in pool if s.label]
    negatives = [s for s in pool if not s.label]
    sizes = []
    for epoch in range(200):
        got = index.epoch("train", epoch, seed=3)
        rng = group_rng(3, "epoch", epoch)  # the same stream orders and draws, fed to the reference's loop
        streams = [iter([positives[i] for i in rng.permutation(len(positives))]),
                   iter([negatives[i] for i in rng.permutation(len(negatives))])]
        assert got == list(reference_random_samples(streams, iter(rng.random, None)))
        keys = [s.key for s in got]
        assert len(keys) == len(set(keys))
        sizes.append(sum(not s.label for s in got))
    assert len(set(sizes)) > 5  # a random number of negatives per epoch ...
    assert abs(np.mean(sizes) - len(positives)) < 1.5  # ... about as many as positives
    assert index.epoch("train", 7, seed=3) == index.epoch("train", 7, seed=3)
    assert index.epoch("val", 3) == index.samples("val")
    with pytest.raises(ValueError, match="random_mix' balances the training epochs"):
        DataConfig(balance=False, balance_plan="random_mix")


def test_resample_policy_redraws_subsets_each_epoch():
    groups = {FRAME: {"20180101": series("20180101", 9, (4,)), "20180301": series("20180301", 2)}}
    index = build(groups, length=3, policy="resample", balance=False)
    draws = set()
    for epoch in range(10):
        samples = sorted(index.epoch("train", epoch, seed=1), key=lambda s: s.primary_date)
        assert len(samples) == 2
        long_series, short = samples
        assert list(long_series.secondary_dates) == sorted(set(long_series.secondary_dates))
        assert long_series.label == int(5 in long_series.unique_ids) and len(short.unique_ids) == 3
        draws.add(long_series.unique_ids)
    assert len(draws) > 3
    assert index.epoch("train", 0, seed=1) == index.epoch("train", 0, seed=1)
    assert set(index.samples("train")) == set(index.epoch("train", 0))


# ------------------------------------------------------------------------- real metadata
def test_real_metadata_counts_for_t1_to_t4(shared_meta):
    ann_loc, ts_loc, stats_loc = find_metadata(str(shared_meta))
    annotations, timeseries = load_annotations(ann_loc), load_timeseries(ts_loc)
    assert len(annotations) == 19_919 and not annotations.problems and stats_loc is not None
    assert sum(len(g) for g in timeseries.values()) == 5_498
    interferograms = Counter()
    for groups in timeseries.values():
        for primary, group in groups.items():
            split = "train" if primary <= "20190531" else "val" if primary <= "20191231" else "test"
            interferograms[split] += group["length"]
    assert sum(interferograms.values()) == 18_911
    for length in (1, 2, 3, 4):
        counts = SampleIndex.build(annotations, timeseries, DataConfig(length=length), seed=0).counts()
        for split, c in counts.items():
            assert c["positives"] + c["negatives"] == c["samples"] and c["positives"] > 0
        if length == 1:
            assert {s: c["samples"] for s, c in counts.items()} == dict(interferograms)
    assert index_counts(str(shared_meta), 4)["train"] == counts["train"]


# ------------------------------------------------------------ the reference's padding draws
REFERENCE_YEARS = {"train": ("20140101", "20190531"), "val": ("20190601", "20191231"), "test": ("20200101", "20211231")}


def reference_dataset_series(timeseries: dict, annotations: dict, mode: str, length: int, seed: int = 333) -> Counter:
    """The series of the reference's `InSarDataset(config, mode)` (dataset/dataset_utils.py), transcribed
    independently of the package from the raw JSON: the constructor seeds Python's `random` with the
    config's seed, slices the index to the mode's primary dates in file order, then per group pads
    (`duplicate_entries`: one randint per missing member, inserted in place in every list), enumerates
    (`get_possible_subsets`) or keeps it. Returns a Counter of (frame, uniqueIDs in series order)."""
    import copy
    import random

    rng = random.Random(seed)
    start, end = REFERENCE_YEARS[mode]
    sliced: dict = {}
    for frame_id, groups in timeseries.items():
        for primary in groups:
            if start <= primary <= end:
                sliced.setdefault(frame_id, {})[primary] = copy.deepcopy(groups[primary])
    series = Counter()
    for frame_id, groups in sliced.items():
        for group in groups.values():
            members = {uid: annotations[str(uid)] for uid in group["uniqueID"]}
            group["label"] = ["Non_Deformation" not in members[uid]["label"] for uid in members]
            positive = any(group["label"])
            if group["length"] < length:
                initial = group["length"]
                for i in range(length - initial):
                    choice = rng.randint(0, initial - 1 + i)
                    for key, value in group.items():
                        if key != "length":
                            value.insert(choice, value[choice])
                    group["length"] += 1
                selections = [tuple(group["uniqueID"])]
            elif group["length"] > length:
                md = (length - 1 if positive else length - 2) if mode == "train" else 1
                selections = [tuple(group["uniqueID"][i] for i in combo)
                              for combo in reference_enumeration(len(group["uniqueID"]), length, md)]
            else:
                selections = [tuple(group["uniqueID"])]
            series.update((frame_id, uids) for uids in selections)
    return series


@pytest.mark.parametrize("length", [2, 3, 4])
def test_reference_padding_gives_the_reference_series_on_the_real_index(shared_meta, length):
    """`data.padding: reference` reproduces the reference's series member for member on the real
    annotations and index, every split; the per-group padding gives the same number of series but,
    from T = 3, other members for some of the padded ones."""
    raw_timeseries = json.loads((shared_meta / "quality_timeseries.json").read_text())
    raw_annotations = json.loads(gzip.decompress((shared_meta / "annotations.json.gz").read_bytes()))
    annotations, timeseries = load_annotations(shared_meta / "annotations.json.gz"), load_timeseries(shared_meta / "quality_timeseries.json")
    ours = SampleIndex.build(annotations, timeseries, DataConfig(length=length, padding="reference"), seed=333)
    per_group = SampleIndex.build(annotations, timeseries, DataConfig(length=length), seed=333)
    for split in ("train", "val", "test"):
        reference = reference_dataset_series(raw_timeseries, raw_annotations, split, length)
        got = Counter((s.frame_id, s.unique_ids) for s in ours.samples(split))
        assert got == reference, f"{split}: {sum((got - reference).values())} series differ"
        other = Counter((s.frame_id, s.unique_ids) for s in per_group.samples(split))
        assert sum(other.values()) == sum(reference.values())
        if length > 2:  # at T = 2 the only padding of a one-member group is that member twice
            assert other != reference


def test_reference_padding_walks_each_split_in_file_order_with_its_own_stream():
    """The draws of a group depend on the short groups before it in its split's walk (file order,
    not sorted), and every split starts its own stream from the seed."""
    from thalia_ray.data.index import reference_padding

    groups = {OTHER: {"20180101": series("20180101", 1), "20190701": series("20190701", 1)},
              FRAME: {"20180101": series("20180101", 2), "20190701": series("20190701", 2)}}
    _, timeseries = dataset(groups)
    splits = DataConfig().splits
    draws = reference_padding(timeseries, splits, 4, seed=333)
    stream = __import__("random").Random(333)
    for split_primary in ("20180101", "20190701"):  # train, then val: each from a fresh stream
        if split_primary == "20190701":
            stream = __import__("random").Random(333)
        for frame in (OTHER, FRAME):  # file order: OTHER first
            uids = timeseries[frame][split_primary]["uniqueID"]
            positions = list(range(len(uids)))
            while len(positions) < 4:
                j = stream.randint(0, len(positions) - 1)
                positions.insert(j, positions[j])
            assert draws[(frame, split_primary)] == tuple(uids[p] for p in positions)
    with pytest.raises(ValueError, match="padding 'reference' pads once"):
        DataConfig(padding="reference", policy="resample")


# ----------------------------------------------------------------------- nothing left out without a word
def _with_unknown_activity(records: dict, count: int) -> list[int]:
    """Give `count` positive records an activity type the vocabulary does not have; returns their ids."""
    changed = [int(k) for k, r in records.items() if "Deformation" in r["label"]][:count]
    for uid in changed:
        records[str(uid)]["activity_type"] = ["Volcanic_Explosion"]
    return changed


def test_records_left_out_are_counted_named_and_placed_in_their_split(tmp_path):
    records, timeseries = dataset({FRAME: {"20180101": series("20180101", 4, positive_at=(0, 1, 2))}})
    changed = _with_unknown_activity(records, 2)
    timeseries[FRAME]["20180101"]["uniqueID"].append(99)  # no such annotation
    timeseries[FRAME]["20180101"]["secondary_date"].append("20190110")
    timeseries[FRAME]["20180101"]["length"] = 5
    write(tmp_path, records, timeseries)
    index = SampleIndex.from_config(DataConfig(root=str(tmp_path), length=1), seed=0)
    assert index.counts()["train"]["positives"] == 1
    rows = [item.row() for item in index.left_out]
    assert [(r["what"], r["key"], r["split"], r["positive"]) for r in rows] == [
        ("annotation", str(changed[0]), "train", True), ("annotation", str(changed[1]), "train", True),
        ("series member", f"{FRAME}/20180101/99", "train", None)]
    assert rows[0]["reason"].startswith("field 'activity_type': unknown value(s) ['Volcanic_Explosion']")
    assert describe_left_out(index.left_out).startswith(
        "2 annotations and 1 series member left out of the index (field 'activity_type' ×2, "
        "no annotation with this uniqueID ×1); e.g. annotation uniqueID")


def test_an_index_that_loses_every_positive_of_a_split_is_an_error_naming_the_cause(tmp_path):
    records, timeseries = dataset({FRAME: {"20180101": series("20180101", 3, positive_at=(0, 1)),
                                           "20200101": series("20200101", 2, positive_at=(0,))}})
    _with_unknown_activity(records, 2)  # both train positives
    write(tmp_path, records, timeseries)
    with pytest.raises(AnnotationError, match=r"annotations.json: the train split lost all 2 of its positive "
                                              r"annotations: 2 annotations left out of the index \(field "
                                              r"'activity_type' ×2\); e.g. annotation uniqueID 1: field"):
        SampleIndex.from_config(DataConfig(root=str(tmp_path), length=1), seed=0)
    records, timeseries = dataset({FRAME: {"20180101": series("20180101", 3)}})  # never had one: no loss
    write(tmp_path, records, timeseries)
    assert SampleIndex.from_config(DataConfig(root=str(tmp_path), length=1), seed=0).counts()["train"]["positives"] == 0


def test_prepare_index_names_what_it_left_out(tmp_path, capsys):
    from thalia_ray.cli import main

    records, timeseries = dataset({FRAME: {"20180101": series("20180101", 4, positive_at=(0, 1, 2))}})
    _with_unknown_activity(records, 1)
    write(tmp_path, records, timeseries)
    assert main(["prepare", "index", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["train", "3", "2", "1"]
    assert out[-1].startswith("1 annotation left out of the index (field 'activity_type' ×1)")
    assert main(["prepare", "index", "--data", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["left_out"]
    assert [(r["what"], r["split"], r["positive"]) for r in listed] == [("annotation", "train", True)]
