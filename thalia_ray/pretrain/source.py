"""Pretraining's sample source: every series of interferograms the cubes hold, with its pretext targets
and no label.

It plugs into the same Ray Data pipeline as the benchmark's sources (`data.sources.Source`): the pipeline
plans each epoch's items, read tasks read windows straight from the cubes and build records here. The
plan comes from the cubes alone (`data.pairs`): the annotations are never opened, and only primary dates
in the allowed benchmark periods (`pretrain.splits`, by default the training period) are planned, so
under the defaults nothing of the validation and test periods, images or labels, reaches pretraining.
A share of the (frame, primary date) groups (`pretrain.holdout`) is held out as pretraining's own
validation split, for its validation loss and best checkpoint: it is not the benchmark's val split.

A record holds the normalised input image (T·C, H, W) as training's, each pretext variable read beside
it (`target_<variable>`, normalised, (T, H, W)), the acquisitions' day-of-year encoding (T + 1, 2), the
frame's index among the planned frames and its position on the sphere (`has_position` 0 where the
volcano table has none). Crops are placed uniformly in the frame (seeded per epoch and key in training,
fixed per key in the held-out split); views and their augmentations are made on the device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from thalia_ray.config import PRETEXT_VARIABLES, DataConfig, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import load_frame_names
from thalia_ray.data.cube import DataError, Window, get_cache, read_window
from thalia_ray.data.index import group_rng
from thalia_ray.data.locations import DataLocations
from thalia_ray.data.pairs import PairSeries, cube_series, frame_ids
from thalia_ray.data.samples import BadSample
from thalia_ray.data.sources import RngFor, Row, Source
from thalia_ray.data.transforms import Statistics, normalize
from thalia_ray.pretrain.geo import Position, day_of_year_encoding, frame_positions
from thalia_ray.storage import Location, S3Options

TRAIN, HOLDOUT = "train", "val"  # pretraining's own splits, as the training loop names its datasets
TARGET_PREFIX = "target_"


def pretext_variables(heads: Mapping[str, float]) -> tuple[str, ...]:
    """The cube variables the weighted multi-modal heads predict, in the dataset contract's channel order."""
    wanted = {v for head, weight in heads.items() if weight for v in PRETEXT_VARIABLES.get(head, ())}
    return tuple(c for c in schema.ALL_CHANNELS if schema.statistics_key(c) in wanted)


def holdout_groups(series: Sequence[PairSeries], fraction: float, seed: int) -> set[str]:
    """At least one and about `fraction` of the (frame, primary) groups, chosen by a hash of the seed: series
    of one group share interferograms, so a group is held out whole."""
    groups = sorted({s.group for s in series}, key=lambda g: zlib.crc32(f"{seed}:{g}".encode()))
    return set(groups[:max(1, math.ceil(fraction * len(groups)))])


@dataclass(frozen=True)
class PretrainSource(Source):
    """Windows of every planned series, their pretext targets and geography; see the module docstring."""

    name: ClassVar[str] = "pairs"
    data: DataConfig
    root: Location
    seed: int
    targets: tuple[str, ...]  # cube variables read beside the channels, as pretext targets
    frames: tuple[str, ...]  # the frame identity classes, sorted
    positions: Mapping[str, Position] = field(default_factory=dict, compare=False)
    pools: Mapping[str, list[PairSeries]] = field(default_factory=dict, compare=False)  # {} in task copies

    @classmethod
    def open(cls, cfg: ThaliaConfig) -> "PretrainSource":
        """Plan every series of the allowed periods from the cubes (no annotation is read)."""
        locations = DataLocations.of(cfg.data, S3Options.of(cfg.storage))
        frames = tuple(cfg.data.frames or frame_ids(locations.root))
        if not frames:
            raise DataError(f"data.root {locations.root.url}: no {schema.CUBE_SUFFIX} cubes to pretrain on")
        periods = {name: cfg.data.splits[name] for name in cfg.pretrain.splits if name in cfg.data.splits}
        series = cube_series(locations.root, frames, cfg.data.length, periods, cfg.seed)
        held = holdout_groups(series, cfg.pretrain.holdout, cfg.seed)
        pools = {TRAIN: [s for s in series if s.group not in held], HOLDOUT: [s for s in series if s.group in held]}
        names = load_frame_names(locations.root)
        positions = frame_positions({frame: names.get(frame, ()) for frame in frames})
        return cls(cfg.data, locations.root, cfg.seed, pretext_variables(cfg.pretrain.heads), frames, positions, pools)

    @property
    def location(self) -> Location:
        return self.root

    @property
    def channels(self) -> list[str]:
        return self.data.channels

    def epoch_items(self, split: str, epoch: int) -> list[PairSeries]:
        pool = self.pools[split]
        if split != TRAIN:
            return list(pool)
        order = group_rng(self.seed, "pretrain-epoch", epoch).permutation(len(pool))
        return [pool[i] for i in order]

    def for_items(self, items: Sequence[PairSeries]) -> "PretrainSource":
        return dataclasses.replace(self, pools={})

    def read(self, items: Sequence[PairSeries], rng: RngFor) -> Iterator[Row | BadSample]:
        cache = get_cache(self.root)
        variables = [*self.channels, *self.targets]
        for series in items:
            origin = cache.root.join(f"{series.frame_id}{schema.CUBE_SUFFIX}").url
            try:
                cube = cache.get(series.frame_id)
                window = self.window(cube.shape, rng(series.key) or group_rng(self.seed, "pretrain-crop", series.key))
                arrays = read_window(cube, series, variables, window)
            except (DataError, OSError, ValueError) as err:
                yield BadSample(origin, series.key, f"{type(err).__name__}: {err}")
                continue
            meta = {"frame_id": series.frame_id, "primary_date": series.primary_date,
                    "secondary_dates": list(series.secondary_dates), "window": list(window)}
            yield {"key": series.key, "origin": origin, "image": np.stack(arrays, axis=1), "meta": json.dumps(meta)}

    def window(self, shape: tuple[int, int], rng: np.random.Generator) -> Window:
        crop, (height, width) = self.data.crop, shape
        if crop > min(height, width):
            raise ValueError(f"crop {crop} is larger than the frame ({height}x{width})")
        return Window(int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1)), crop, crop)

    def record(self, row: Row, split: str, stats: Statistics | None, rng: np.random.Generator | None,
               training: bool) -> dict[str, Any]:
        meta = json.loads(row["meta"])
        stack = np.asarray(row["image"], dtype=np.float32)  # (T, C + targets, h, w)
        if stats is not None:
            stack = normalize(stack, [*self.channels, *self.targets], stats)
        steps, _, height, width = stack.shape
        inputs = len(self.channels)
        frame = meta["frame_id"]
        position = self.positions.get(frame)
        dates = [meta["primary_date"], *meta["secondary_dates"]]
        return {
            "image": np.ascontiguousarray(stack[:, :inputs].reshape(steps * inputs, height, width)),
            **{f"{TARGET_PREFIX}{v}": np.ascontiguousarray(stack[:, inputs + i]) for i, v in enumerate(self.targets)},
            "day_of_year": np.asarray([day_of_year_encoding(d) for d in dates], dtype=np.float32),
            "frame": np.int64(self.frames.index(frame)),
            "position": np.asarray(position if position is not None else (0.0, 0.0, 0.0), dtype=np.float32),
            "has_position": np.float32(position is not None),
            "key": str(row["key"]),
            "frame_id": frame,
        }

    def extra_bytes(self) -> int:
        """The pretext maps beside the image, less the mask a labelled record would hold."""
        data = self.data
        return (4 * data.length * len(self.targets) - 8) * data.crop * data.crop
