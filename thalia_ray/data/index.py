"""The sample index: temporal splits, time series of length T, labels and balanced epochs.

Samples are built exactly as the published benchmark does (see docs/benchmark.md): groups
are (frame, primary date); short groups are padded by duplicating members in place; long groups
are enumerated greedily (lexicographic combinations, dropping those that share `min_distinct`
members with a kept one) or re-drawn every epoch. All randomness is derived from the seed, so the
same configuration always yields the same index: per group by default, or, with `data.padding:
reference`, the reference code's own padding draws (`reference_padding`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import zlib
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from thalia_ray.config import DataConfig
from thalia_ray.data.annotations import (AnnotationError, AnnotationSet, LeftOut, describe_left_out, find_metadata,
                                         load_annotations, load_timeseries)
from thalia_ray.data.samples import Sample
from thalia_ray.storage import Location

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Group:
    """One (frame, primary date) series of the time-series index, members in secondary-date order."""

    frame_id: str
    primary_date: str
    secondary_dates: tuple[str, ...]
    unique_ids: tuple[int, ...]
    member_positive: tuple[bool, ...]
    split: str

    @property
    def positive(self) -> bool:
        return any(self.member_positive)


# ----------------------------------------------------------------------------- pure helpers
def split_of(primary_date: str, splits: dict[str, Any]) -> str | None:
    """The split whose inclusive [start, end] range holds the primary date, or None."""
    day = datetime.strptime(primary_date, "%Y%m%d").date()
    for name, rng in splits.items():
        start, end = (rng.start, rng.end) if hasattr(rng, "start") else rng
        if _as_date(start) <= day <= _as_date(end):
            return name
    return None


def _as_date(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def group_rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator determined by the seed and a stable description of what it is for."""
    words = [zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng([seed & 0xFFFFFFFF, *words])


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A training sample's generator for one epoch (its crop under the centred policy, its augmentations)."""
    return group_rng(seed, "sample", epoch, key)


def pad_positions(n: int, length: int, rng: np.random.Generator | Callable[[int], int]) -> tuple[int, ...]:
    """Member positions padded to `length` by duplicating random members in place (order kept): each
    step duplicates the member at a position drawn uniformly from the current ones. `rng` is a
    generator or a function `size -> position in [0, size)`."""
    draw = rng if callable(rng) else lambda size: int(rng.integers(size))
    positions = list(range(n))
    while len(positions) < length:
        j = draw(len(positions))
        positions.insert(j, positions[j])
    return tuple(positions)


PadDraws = Mapping[tuple[str, str], tuple[int, ...]]  # (frame, primary date) -> padded uniqueIDs, in order


def reference_padding(timeseries: Mapping[str, Mapping[str, Mapping[str, Any]]], splits: dict[str, Any],
                      length: int, seed: int) -> dict[tuple[str, str], tuple[int, ...]]:
    """The reference code's padding of every group shorter than `length`, as uniqueIDs in series order.

    The reference builds each split's dataset with Python's `random` seeded afresh (`seed`), walks the
    time-series index in file order (frames, then their primary dates, keeping the split's) and pads
    each short group as it meets it, one `randint(0, size - 1)` per missing member; so a group's draws
    depend on every short group before it in its split. The whole index is walked, whatever
    `data.frames` selects, as the reference does.
    """
    draws: dict[tuple[str, str], tuple[int, ...]] = {}
    for split in splits:
        stream = random.Random(seed)
        for frame_id, groups in timeseries.items():
            for primary, entry in groups.items():
                uids = entry["uniqueID"]
                if len(uids) < length and split_of(primary, splits) == split:
                    positions = pad_positions(len(uids), length, lambda size: stream.randint(0, size - 1))
                    draws[(frame_id, primary)] = tuple(uids[p] for p in positions)
    return draws


@functools.lru_cache(maxsize=None)
def enumerate_subsets(n: int, length: int, min_distinct: int) -> tuple[tuple[int, ...], ...]:
    """Published greedy enumeration: keep each lexicographic combination not yet dropped, then drop
    every remaining one sharing at least `min_distinct` members with it.

    Vectorised over all combinations (7,315 for n=22, T=4) and cached per (n, T, min_distinct),
    because many groups have the same size.
    """
    combos = np.array(list(itertools.combinations(range(n), length)), dtype=np.int64)
    members = np.zeros((len(combos), n), dtype=np.int16)
    np.put_along_axis(members, combos, 1, axis=1)
    alive = np.ones(len(combos), dtype=bool)
    kept: list[tuple[int, ...]] = []
    i = 0
    while True:
        remaining = np.flatnonzero(alive[i:])
        if not remaining.size:
            break
        i += int(remaining[0])
        kept.append(tuple(int(v) for v in combos[i]))
        alive[i] = False
        alive &= members @ members[i] < min_distinct
    return tuple(kept)


def min_distinct(split: str, length: int, group_positive: bool) -> int:
    """Overlap threshold of the published enumeration: train oversamples positive groups."""
    if split != "train":
        return 1
    return length - 1 if group_positive else length - 2


def series_label(member_positive: Sequence[bool], rule: str) -> int:
    """Series label: any member positive (`union`) or the last member positive (`last`)."""
    if rule == "union":
        return int(any(member_positive))
    if rule == "last":
        return int(member_positive[-1])
    raise ValueError(f"unknown label rule {rule!r}; allowed: union, last")


def make_sample(group: Group, positions: Sequence[int], label_rule: str) -> Sample:
    uids = tuple(group.unique_ids[p] for p in positions)
    positive = tuple(group.member_positive[p] for p in positions)
    return Sample(
        key=f"{group.frame_id}-{group.primary_date}-{'_'.join(map(str, uids))}",
        frame_id=group.frame_id,
        primary_date=group.primary_date,
        secondary_dates=tuple(group.secondary_dates[p] for p in positions),
        unique_ids=uids,
        member_positive=positive,
        label=series_label(positive, label_rule),
        split=group.split,
    )


def enumerated_positions(group: Group, length: int, seed: int, pad_draws: PadDraws | None = None) -> list[tuple[int, ...]]:
    """The published ("enumerate") member selections of one group. A short group is padded with its
    draw in `pad_draws` (`reference_padding`) when there is one for exactly its members, else from its
    own generator (also for a group that lost members to bad annotations, on which the reference fails)."""
    n = len(group.unique_ids)
    if length == 1:
        return [(i,) for i in range(n)]
    if n < length:
        drawn = (pad_draws or {}).get((group.frame_id, group.primary_date))
        if drawn is not None and set(drawn) == set(group.unique_ids):
            return [tuple(group.unique_ids.index(uid) for uid in drawn)]
        return [pad_positions(n, length, group_rng(seed, "pad", group.frame_id, group.primary_date))]
    if n == length:
        return [tuple(range(n))]
    return list(enumerate_subsets(n, length, min_distinct(group.split, length, group.positive)))


def resampled_positions(group: Group, length: int, seed: int, epoch: int) -> list[tuple[int, ...]]:
    """The per-epoch ("resample") selection: one random order-preserving subset or padding."""
    n = len(group.unique_ids)
    if length == 1:
        return [(i,) for i in range(n)]
    rng = group_rng(seed, "resample", epoch, group.frame_id, group.primary_date)
    if n <= length:
        return [pad_positions(n, length, rng)]
    return [tuple(sorted(int(v) for v in rng.choice(n, size=length, replace=False)))]


def build_groups(
    annotations: AnnotationSet,
    timeseries: dict[str, dict[str, dict[str, Any]]],
    splits: dict[str, Any],
    frames: Sequence[str] | None = None,
) -> tuple[list[Group], list[LeftOut]]:
    """Groups of the time-series index that fall in a split, and what was left out: members whose annotation
    is missing or inconsistent, and the annotations left out as malformed (with the split of their series)."""
    groups: list[Group] = []
    dropped: list[LeftOut] = []
    malformed = {item.key: item for item in annotations.left_out}
    wanted = set(frames) if frames is not None else None
    for frame_id in sorted(timeseries):
        if wanted is not None and frame_id not in wanted:
            continue
        for primary in sorted(timeseries[frame_id]):
            split = split_of(primary, splits)
            if split is None:
                continue
            entry = timeseries[frame_id][primary]
            members = []
            for secondary, uid in zip(entry["secondary_date"], entry["uniqueID"]):
                ann = annotations.get(uid)
                if ann is not None and (ann.frame_id, ann.primary_date, ann.secondary_date) == (frame_id, primary, secondary):
                    members.append((secondary, uid, ann.positive))
                elif str(uid) in malformed:  # named once, as the annotation, now with its series' split
                    malformed[str(uid)] = dataclasses.replace(malformed[str(uid)], frame_id=frame_id, split=split)
                else:
                    reason = ("no annotation with this uniqueID; member skipped" if ann is None else
                              f"its annotation is for {ann.frame_id}/{ann.primary_date}/{ann.secondary_date}, "
                              f"not {secondary}; member skipped")
                    dropped.append(LeftOut("series member", f"{frame_id}/{primary}/{uid}", reason, frame_id, split,
                                           None if ann is None else ann.positive))
            if members:
                members.sort()
                secondaries, uids, positives = zip(*members)
                groups.append(Group(frame_id, primary, secondaries, uids, positives, split))
    return groups, [*malformed.values(), *dropped]


def lost_positives(groups: Sequence[Group], left_out: Sequence[LeftOut], splits: Sequence[str]) -> None:
    """Refuse an index in which a split lost every positive annotation it had: training or testing on it
    would report on no deformation at all. The error names how many were left out and why."""
    for split in splits:
        kept = sum(sum(g.member_positive) for g in groups if g.split == split)
        lost = [item for item in left_out if item.split == split and item.positive]
        if lost and not kept:
            raise AnnotationError(f"the {split} split lost all {len(lost)} of its positive annotations: "
                                  f"{describe_left_out(lost)}. Fix the records (data.on_malformed_annotation: fail "
                                  "stops at the first one)")


# ------------------------------------------------------------------------------------ index
class SampleIndex:
    """Samples per split, and the per-epoch lists the training pipeline consumes."""

    def __init__(self, groups: list[Group], annotations: AnnotationSet, data_cfg: DataConfig, seed: int,
                 left_out: list[LeftOut], pad_draws: PadDraws | None = None) -> None:
        self.annotations = annotations
        self.data_cfg = data_cfg
        self.seed = seed
        self.left_out = left_out  # annotations and series members the index leaves out, and why
        self.pad_draws = pad_draws
        self.groups: dict[str, list[Group]] = {s: [] for s in data_cfg.splits}
        for group in groups:
            self.groups[group.split].append(group)
        self._fixed: dict[str, list[Sample]] = {
            split: self._draw(split, epoch=0) for split in self.groups
        }

    @classmethod
    def build(cls, annotations: AnnotationSet, timeseries: dict[str, Any], data_cfg: DataConfig,
              seed: int) -> "SampleIndex":
        groups, left_out = build_groups(annotations, timeseries, data_cfg.splits, data_cfg.frames)
        lost_positives(groups, left_out, list(data_cfg.splits))
        pad_draws = (reference_padding(timeseries, data_cfg.splits, data_cfg.length, seed)
                     if data_cfg.padding == "reference" else None)
        return cls(groups, annotations, data_cfg, seed, left_out, pad_draws)

    @classmethod
    def from_config(cls, data_cfg: DataConfig, seed: int, location: str | Location | None = None) -> "SampleIndex":
        """Load annotations and the time-series index from `data_cfg.root` (or `location`)."""
        ann_loc, ts_loc, _ = find_metadata(location or data_cfg.root)
        annotations = load_annotations(ann_loc, data_cfg.on_malformed_annotation)
        timeseries = load_timeseries(ts_loc)
        try:
            return cls.build(annotations, timeseries, data_cfg, seed)
        except AnnotationError as err:
            raise AnnotationError(f"{ann_loc}: {err}") from None

    def _draw(self, split: str, epoch: int) -> list[Sample]:
        length, rule = self.data_cfg.length, self.data_cfg.label_rule_for(split)
        samples = []
        for group in self.groups[split]:
            if self.data_cfg.policy == "enumerate":
                selections = enumerated_positions(group, length, self.seed, self.pad_draws)
            else:
                selections = resampled_positions(group, length, self.seed, epoch)
            samples.extend(make_sample(group, positions, rule) for positions in selections)
        return samples

    def samples(self, split: str) -> list[Sample]:
        """The split's samples: the fixed list (enumerate) or the epoch-0 draw (resample)."""
        if split not in self._fixed:
            raise KeyError(f"unknown split {split!r}; configured: {list(self._fixed)}")
        return self._fixed[split]

    def epoch(self, split: str, epoch: int, seed: int | None = None) -> list[Sample]:
        """One epoch's samples (`epoch_draw`). Train: by default every positive plus as many fresh random
        negatives, shuffled (deterministic for seed and epoch). Val/test: everything, in index order."""
        seed = self.seed if seed is None else seed
        pool = self.samples(split) if self.data_cfg.policy == "enumerate" or epoch == 0 else self._draw(split, epoch)
        return epoch_draw(pool, split, epoch, seed, self.data_cfg.epoch_plan, self.data_cfg.label_fraction)

    @property
    def problems(self) -> list[str]:
        """One line per annotation or series member left out."""
        return [str(item) for item in self.left_out]

    def counts(self) -> dict[str, dict[str, int]]:
        return {split: count_labels(samples) for split, samples in self._fixed.items()}


EPOCH_PLANS = ("all", "equal", "random_mix")


def epoch_draw(pool: Sequence[Any], split: str, epoch: int, seed: int, plan: str,
               label_fraction: float = 1.0) -> list[Any]:
    """One epoch of items carrying a `.label` and a `.key`, from a pool in index order. Index samples and
    shard entries both go through here, so the cube and shard sources draw the same epoch.

    Train: `plan` (`DataConfig.epoch_plan`) all, equal or random_mix over the `label_fraction` of its
    labelled items it keeps (see `labelled_subset`), in a seeded random order (fresh each epoch).
    Val/test: everything, in index order."""
    if split != "train":
        return list(pool)
    rng = group_rng(seed, "epoch", epoch)
    kept = labelled_subset(pool, label_fraction, seed)
    if plan == "random_mix":
        return random_mix(kept, rng)
    if plan not in EPOCH_PLANS:
        raise ValueError(f"unknown epoch plan {plan!r}; expected one of {EPOCH_PLANS}")
    chosen = balanced(kept, rng) if plan == "equal" else kept
    return [chosen[i] for i in rng.permutation(len(chosen))]


def labelled_subset(pool: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    """`fraction` of each class of `pool` (rounded up, so a class keeps at least one item), in pool order.

    Items are ranked by a hash of the seed and their key, independent of the epoch, so every epoch,
    source and arm of a label-efficiency study sees the same subset, and a smaller fraction keeps the
    first items of the same ranking: the 5 % subset lies inside the 20 %."""
    if fraction >= 1:
        return list(pool)
    kept: set[int] = set()
    for positive in (True, False):
        members = [i for i, item in enumerate(pool) if (item.label == 1) == positive]
        ranked = sorted(members, key=lambda i: zlib.crc32(f"{seed}:{pool[i].key}".encode()))
        kept.update(ranked[:math.ceil(fraction * len(members))])
    return [item for i, item in enumerate(pool) if i in kept]


def balanced(samples: Sequence[Any], rng: np.random.Generator) -> list[Any]:
    """Every positive plus an equal number of negatives drawn without replacement."""
    positives = [s for s in samples if s.label == 1]
    negatives = [s for s in samples if s.label != 1]
    take = min(len(positives), len(negatives))
    chosen = sorted(rng.choice(len(negatives), size=take, replace=False)) if take else []
    return positives + [negatives[i] for i in chosen]


def random_mix(samples: Sequence[Any], rng: np.random.Generator) -> list[Any]:
    """The reference's training epoch on its shards (`RandomMix` in utilities/utils.py): a shuffled
    positive and a shuffled negative stream; each next sample comes from the positives when a uniform
    draw is at most 1/2, else from the negatives; the epoch ends at the first draw that meets an
    exhausted stream. So it holds every positive (in practice: the positives run out first) and a
    random number of negatives, about as many, in an order that is uniformly random."""
    positives = [s for s in samples if s.label == 1]
    negatives = [s for s in samples if s.label != 1]
    streams = [iter([positives[i] for i in rng.permutation(len(positives))]),
               iter([negatives[i] for i in rng.permutation(len(negatives))])]
    mixed = []
    while (item := next(streams[0 if rng.random() <= 0.5 else 1], None)) is not None:
        mixed.append(item)
    return mixed


def count_labels(samples: Sequence[Sample]) -> dict[str, int]:
    positives = sum(s.label for s in samples)
    return {"samples": len(samples), "positives": positives, "negatives": len(samples) - positives}


def index_at(
    location: str | Location,
    length: int,
    policy: Literal["enumerate", "resample"] = "enumerate",
    data_cfg: DataConfig | None = None,
    seed: int = 0,
) -> SampleIndex:
    """The index of a dataset root or a metadata folder for series length `length`."""
    base = (data_cfg or DataConfig()).model_dump()
    cfg = DataConfig.model_validate({**base, "length": length, "policy": policy})
    return SampleIndex.from_config(cfg, seed, location=location)


def index_counts(location: str | Location, length: int, policy: Literal["enumerate", "resample"] = "enumerate",
                 data_cfg: DataConfig | None = None, seed: int = 0) -> dict[str, dict[str, int]]:
    """`{split: {samples, positives, negatives}}` for a dataset root or a metadata folder."""
    return index_at(location, length, policy, data_cfg, seed).counts()
