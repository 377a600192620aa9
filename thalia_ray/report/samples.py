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
from thalia_ray.storage import Location, S3Options

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
    target: np.ndarray  # (H, W), or (T, H, W) under data.mask_target=all: what the model was trained to predict
    predicted: np.ndarray | None  # the model's Deformation probability, shaped like `target` (pixel-wise tasks)


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
    """The chosen prediction rows as images; the model's probability map when `checkpoint` is set."""
    from thalia_ray.data import schema
    from thalia_ray.data.cube import crop_rng, get_cache, read_raw, sample_window
    from thalia_ray.data.index import SampleIndex
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.data.transforms import mask_target

    root = DataLocations.of(cfg.data, S3Options.of(cfg.storage)).root
    index = SampleIndex.from_config(cfg.data, cfg.seed, root)
    by_key = {s.key: s for s in index.samples(split)}
    cache = get_cache(root)
    predictor = _Predictor(cfg, checkpoint) if checkpoint is not None else None
    gallery = []
    for row in rows:
        sample = by_key.get(row["key"])
        if sample is None:
            log.warning("report: sample %s is not in the %s split of %s", row["key"], split, cfg.data.root)
            continue
        window = sample_window(sample, index.annotations, cache.get(sample.frame_id), cfg.data,
                               crop_rng(cfg.data.crop_policy, cfg.seed, sample.key))  # the evaluated crop
        raw = read_raw(sample, cache, window, list(schema.GEOMORPHOLOGY), index.annotations)
        model_input = read_raw(sample, cache, window, cfg.data.channels, index.annotations)
        gallery.append(GallerySample(
            key=sample.key, outcome=outcome(row), score=float(row["score"]), label=int(row["label"]),
            pred=int(row["pred"]), dates=[f"{sample.primary_date}/{d}" for d in sample.secondary_dates],
            phase=raw.image[:, 0], coherence=raw.image[:, 1], dem=raw.image[:, 2], mask=raw.mask,
            target=mask_target(raw.mask, cfg.data.mask_target),
            predicted=predictor(model_input) if predictor is not None else None))
    return gallery


class _Predictor:
    """A pixel-wise model's Deformation probability for one sample as evaluation saw it, on CPU."""

    def __init__(self, cfg: ThaliaConfig, checkpoint: Any) -> None:
        from thalia_ray.predict import inputs

        self.cfg, self.statistics = cfg, inputs.run_statistics(cfg)
        self.model = inputs.load_model(cfg, checkpoint).eval()

    def __call__(self, raw: Any) -> np.ndarray:
        import torch

        from thalia_ray.data.transforms import finalize

        record = finalize(raw, self.cfg.data, self.statistics, None, training=False)
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
