"""Arrays for the report: gallery samples read back from the dataset, and `predict`'s probability maps.

Gallery samples are read with the run's stored configuration through the same index and cube reader
as training (the deterministic evaluation crop), so the page shows exactly what the model saw.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from thalia_ray.config import ThaliaConfig
from thalia_ray.storage import Location

log = logging.getLogger(__name__)

PROBABILITY = "deformation_probability"  # the variable of `predict`'s output cubes


@dataclass(frozen=True)
class GallerySample:
    key: str
    outcome: str  # TP, FP, FN or TN
    score: float
    label: int
    pred: int
    dates: list[str]  # "primary/secondary" per member
    phase: np.ndarray  # (T, H, W) wrapped phase, rad
    coherence: np.ndarray  # (T, H, W)
    dem: np.ndarray  # (T, H, W)
    mask: np.ndarray  # (T, H, W) true deformation mask
    predicted: np.ndarray | None  # (H, W) Deformation probability (segmentation models)


def outcome(row: Mapping[str, Any]) -> str:
    return {(1, 1): "TP", (0, 1): "FP", (1, 0): "FN", (0, 0): "TN"}[(int(row["label"]), int(row["pred"]))]


def pick(rows: Sequence[Mapping[str, Any]], per_outcome: Mapping[str, int]) -> list[Mapping[str, Any]]:
    """The most telling rows: confident hits and mistakes first (TP/FP by high score, FN by low)."""
    chosen: list[Mapping[str, Any]] = []
    for name, count in per_outcome.items():
        matching = [r for r in rows if outcome(r) == name]
        matching.sort(key=lambda r: r["score"], reverse=name in ("TP", "FP"))
        chosen.extend(matching[:count])
    return chosen


def read_gallery(cfg: ThaliaConfig, rows: Sequence[Mapping[str, Any]], checkpoint: Any | None,
                 split: str = "test") -> list[GallerySample]:
    """The chosen prediction rows as images; a segmentation model's probability map when `checkpoint` is set."""
    from thalia_ray.data import schema
    from thalia_ray.data.cube import crop_rng, get_cache, read_raw, sample_window
    from thalia_ray.data.index import SampleIndex
    from thalia_ray.data.locations import DataLocations

    index = SampleIndex.from_config(cfg.data, cfg.seed)
    by_key = {s.key: s for s in index.samples(split)}
    cache = get_cache(DataLocations.of(cfg.data, cfg.storage).root)
    predictor = _Predictor(cfg, checkpoint, index, cache) if checkpoint is not None else None
    gallery = []
    for row in rows:
        sample = by_key.get(row["key"])
        if sample is None:
            log.warning("report: sample %s is not in the %s split of %s", row["key"], split, cfg.data.root)
            continue
        window = sample_window(sample, index.annotations, cache.get(sample.frame_id), cfg.data,
                               crop_rng(cfg.data.crop_policy, cfg.seed, sample.key))  # the evaluated crop
        raw = read_raw(sample, cache, window, list(schema.GEOMORPHOLOGY), index.annotations)
        gallery.append(GallerySample(
            key=sample.key, outcome=outcome(row), score=float(row["score"]), label=int(row["label"]),
            pred=int(row["pred"]), dates=[f"{sample.primary_date}/{d}" for d in sample.secondary_dates],
            phase=raw.image[:, 0], coherence=raw.image[:, 1], dem=raw.image[:, 2], mask=raw.mask,
            predicted=predictor(sample) if predictor is not None else None))
    return gallery


class _Predictor:
    """A segmentation model's Deformation probability map for one sample, on CPU."""

    def __init__(self, cfg: ThaliaConfig, checkpoint: Any, index: Any, cache: Any) -> None:
        from thalia_ray.train.evaluate import load_model

        self.cfg, self.index, self.cache = cfg, index, cache
        self.model = load_model(cfg, checkpoint).eval()

    def __call__(self, sample: Any) -> np.ndarray:
        import torch

        from thalia_ray.data.cube import load_sample

        record = load_sample(sample, self.index, self.cfg.data, self.cache, None, training=False)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(record["image"])[None])["logits"]
        return logits.float().softmax(dim=1)[0, 1].numpy()


def predicted_frames(folder: Location) -> dict[str, np.ndarray]:
    """`predict`'s output cubes under `folder` ({frame}.zarr with deformation_probability): each frame's
    largest probability over all its dates, per pixel. Empty when there is no such output."""
    import xarray as xr

    maps: dict[str, np.ndarray] = {}
    if not folder.exists():
        return maps
    for name in folder.list():
        if not name.endswith(".zarr"):
            continue
        try:
            data = xr.open_zarr(folder.join(name).zarr_store(), consolidated=False)[PROBABILITY]
        except (KeyError, OSError, ValueError) as err:
            log.warning("report: %s is not a predict output (%s)", folder.join(name), err)
            continue
        spatial = list(data.dims)[-2:]
        maps[name.removesuffix(".zarr")] = data.max(dim=[d for d in data.dims if d not in spatial]).values
    return maps
