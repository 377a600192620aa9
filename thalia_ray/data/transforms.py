"""From a raw windowed read to a model-ready record: targets, normalisation, augmentations.

Pure NumPy/SciPy, so the same code runs in Ray Data tasks, in shard export and in tests. Every
geometric augmentation is expressed as one map of sampling coordinates applied to the image
(bilinear) and to the mask (nearest), which keeps the two aligned by construction.
"""
from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from scipy import ndimage

from thalia_ray.config import AugmentConfig, DataConfig
from thalia_ray.data import schema
from thalia_ray.data.index import series_label
from thalia_ray.data.samples import RawSample
from thalia_ray.storage import Location, local

if TYPE_CHECKING:
    from torch import Tensor

Statistics = dict[str, dict[str, float]]


# ------------------------------------------------------------------------------ statistics
def load_statistics(location: str | Location) -> Statistics:
    """Read statistics.json (`{variable: {mean, std}}`), checking every entry is usable."""
    loc = local(location)
    raw = loc.read_json()
    if not isinstance(raw, dict):
        raise ValueError(f"{loc}: expected an object keyed by variable name")
    stats: Statistics = {}
    for name, entry in raw.items():
        mean, std = (entry.get("mean"), entry.get("std")) if isinstance(entry, dict) else (None, None)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mean, std)) or std <= 0:
            raise ValueError(f"{loc}: {name!r} needs a finite mean and a positive std, got {entry!r}")
        stats[name] = {"mean": float(mean), "std": float(std)}
    return stats


@functools.lru_cache(maxsize=8)
def statistics_for(location: Location) -> Statistics:
    """`load_statistics`, read once per process and location (see DataLocations.statistics)."""
    return load_statistics(location)


def normalize(image: np.ndarray, channels: Sequence[str], stats: Statistics) -> np.ndarray:
    """(T, C, h, w) → standardised float32 copy; ERA5 primary and secondary channels share one entry.

    In float32, as the reference's per-channel torch loop computes it (its Python-float mean and std
    act as float32 scalars): the same values bit for bit, and about 30× faster than through float64.
    """
    keys = [schema.statistics_key(c) for c in channels]
    missing = sorted({k for k in keys if k not in stats})
    if missing:
        raise ValueError(f"statistics have no entry for {missing} (channels {list(channels)})")
    mean = np.array([stats[k]["mean"] for k in keys], dtype=np.float32)[None, :, None, None]
    std = np.array([stats[k]["std"] for k in keys], dtype=np.float32)[None, :, None, None]
    standardised = np.subtract(np.asarray(image, dtype=np.float32), mean)
    standardised /= std
    return standardised


# --------------------------------------------------------------------------------- targets
def mask_target(mask: np.ndarray, target: str) -> np.ndarray:
    """(T, h, w) cube mask (0/1/2) → binary target: `last`, `peak`, `union` (h, w) or `all` (T, h, w)."""
    if mask.size and (mask.max() > schema.MASK_EARTHQUAKE):
        raise ValueError(f"mask values must be 0, 1 or 2; found {np.unique(mask).tolist()}")
    binary = (mask > 0).astype(np.uint8)  # earthquake (2) counts as deformation (1)
    if target == "last":
        return binary[-1]
    if target == "peak":
        return binary[int(np.argmax(binary.reshape(len(binary), -1).sum(axis=1)))]
    if target == "union":
        return binary.max(axis=0)
    if target == "all":
        return binary
    raise ValueError(f"unknown mask target {target!r}; allowed: last, peak, union, all")


def segmentation_target(mask: "Tensor") -> "Tensor":
    """A batch of target masks as losses and metrics score it: (B, H, W) as it is; (B, T, H, W) (mask_target
    `all`) → its union over T. Takes torch tensors; this module imports no torch itself."""
    if mask.ndim == 4:
        return mask.amax(dim=1)
    if mask.ndim != 3:
        raise ValueError(f"batch['mask'] must be (B, H, W) or (B, T, H, W), got {tuple(mask.shape)}")
    return mask


def aux_targets(meta: dict[str, Any]) -> dict[str, Any]:
    """Auxiliary targets and strings from the per-member annotation fields of a sample."""
    positive = meta["member_positive"]
    activity = np.zeros(len(schema.ACTIVITY_TYPES), dtype=np.float32)
    for types in meta["activity_types"]:
        for kind in types:
            activity[schema.ACTIVITY_TYPES.index(kind)] = 1.0
    levels = [schema.INTENSITY_LEVELS.index(level)
              for levels_, pos in zip(meta["intensity_levels"], positive) if pos for level in levels_]
    if not any(positive):
        intensity = 0  # no deformation: intensity "None"
    else:
        intensity = max(levels) if levels else -1
    first_types = [t for types, pos in zip(meta["activity_types"], positive) if pos for t in types]
    flags = meta["flags"]
    fringes = [
        any(f["glacier_fringes"] > 0 for f in flags),
        any(f["orbital_fringes"] > 0 for f in flags),
        any(f["atmospheric_fringes"] > 0 for f in flags),
        any(f["low_coherence"] > 0 for f in flags),
    ]
    phase = meta["phase"]
    return {
        "aux_activity_type": activity,
        "aux_intensity": np.int64(intensity),
        "aux_phase": np.int64(schema.PHASES.index(phase) if phase in schema.PHASES else -1),
        "aux_fringes": np.asarray(fringes, dtype=np.float32),
        "intensity": schema.INTENSITY_LEVELS[intensity] if intensity >= 0 else "None",
        "activity_type": first_types[0] if first_types else "None",
    }


# ---------------------------------------------------------------------------- augmentation
def _coordinate_map(shape: tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray | None:
    """Sampling coordinates (2, H, W) for rotation, resized crop and elastic, or None if none fired."""
    height, width = shape
    rows, cols = _pixel_grid(height, width)
    changed = False
    if rng.random() < cfg.resized_crop:
        side = math.sqrt(rng.uniform(*cfg.resized_crop_scale))
        crop_h, crop_w = max(2.0, side * height), max(2.0, side * width)
        row0, col0 = rng.uniform(0, height - crop_h), rng.uniform(0, width - crop_w)
        rows = row0 + rows * (crop_h - 1) / max(height - 1, 1)
        cols = col0 + cols * (crop_w - 1) / max(width - 1, 1)
        changed = True
    if rng.random() < cfg.rotate:
        angle = math.radians(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees))
        cr, cc = (height - 1) / 2, (width - 1) / 2
        dr, dc = rows - cr, cols - cc
        rows, cols = cr + dr * math.cos(angle) - dc * math.sin(angle), cc + dr * math.sin(angle) + dc * math.cos(angle)
        changed = True
    if rng.random() < cfg.elastic:
        shift_r = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), cfg.elastic_sigma) * cfg.elastic_alpha
        shift_c = ndimage.gaussian_filter(rng.uniform(-1, 1, shape), cfg.elastic_sigma) * cfg.elastic_alpha
        rows, cols = rows + shift_r, cols + shift_c
        changed = True
    return np.stack([rows, cols]) if changed else None


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of every pixel, made once per crop size (read-only: shared by all samples)."""
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _remap(stack: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Resample every (H, W) plane of a (N, H, W) stack at `coords`; outside the frame is 0."""
    out = np.empty(stack.shape, dtype=np.float32 if order else stack.dtype)
    for i, plane in enumerate(stack):
        out[i] = ndimage.map_coordinates(plane, coords, order=order, mode="constant", cval=0)
    return out


def geometric(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random geometric transform on image (N, H, W, bilinear) and mask (M, H, W, nearest)."""
    coords = _coordinate_map(image.shape[-2:], cfg, rng)
    if coords is not None:
        image, mask = _remap(image, coords, order=1), _remap(mask, coords, order=0)
    if rng.random() < cfg.hflip:
        image, mask = image[..., ::-1], mask[..., ::-1]
    if rng.random() < cfg.vflip:
        image, mask = image[..., ::-1, :], mask[..., ::-1, :]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def photometric(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Image-only augmentations on a normalised (N, H, W) stack: blur, noise, cutout.

    Each one that fires makes a new array, so the input (perhaps the decoded sample itself) is never
    changed and a sample none of them touches is not copied.
    """
    image = np.asarray(image, dtype=np.float32)
    if rng.random() < cfg.blur:
        sigma = rng.uniform(*cfg.blur_sigma)
        image = ndimage.gaussian_filter(image, sigma=(0, sigma, sigma)).astype(np.float32)
    if rng.random() < cfg.multiplicative_noise:
        image = image * rng.uniform(*cfg.multiplicative_range, size=(len(image), 1, 1)).astype(np.float32)
    if rng.random() < cfg.gaussian_noise:
        image = image + rng.normal(0.0, cfg.gaussian_noise_std, size=image.shape).astype(np.float32)
    if rng.random() < cfg.cutout:
        height, width = image.shape[-2:]
        h, w = max(1, round(cfg.cutout_fraction * height)), max(1, round(cfg.cutout_fraction * width))
        r, c = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
        image = image.copy()
        image[:, r:r + h, c:c + w] = 0.0  # the channel mean after normalisation
    return image


def augment(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment a (N, H, W) image and an (H, W) or (T, H, W) mask together."""
    masks = mask[None] if mask.ndim == 2 else mask
    image, masks = geometric(image, masks, cfg, rng)
    return photometric(image, cfg, rng), (masks[0] if mask.ndim == 2 else masks)


# ---------------------------------------------------------------------------------- record
def finalize(raw: RawSample, data_cfg: DataConfig, stats: Statistics | None,
             rng: np.random.Generator | None, training: bool) -> dict[str, Any]:
    """RawSample → record: target mask, label, normalised (T·C, H, W) image (time-major), aux targets."""
    steps, channels, height, width = raw.image.shape
    mask = mask_target(raw.mask, data_cfg.mask_target)
    image = raw.image
    if data_cfg.normalize:
        if stats is None:
            raise ValueError("data.normalize is set but no statistics were given")
        image = normalize(image, data_cfg.channels, stats)
    image = np.asarray(image, dtype=np.float32).reshape(steps * channels, height, width)
    if training and data_cfg.augmentations:
        if rng is None:
            raise ValueError("training augmentations need a random generator (rng)")
        image, mask = augment(image, mask, data_cfg.augment, rng)
    meta = raw.meta
    return {
        "image": np.ascontiguousarray(image, dtype=np.float32),
        "mask": mask.astype(np.int64),
        "label": np.int64(series_label(meta["member_positive"], data_cfg.label_rule_for("train" if training else "test"))),
        "confidence": np.float32(meta["confidence"]),
        **aux_targets(meta),
        "key": raw.key,
        "frame_id": meta["frame_id"],
    }
