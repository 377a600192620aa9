"""Build a model from its configuration: registry lookup, builder call, initial weights, frozen layers.

`model.pretrained`: `imagenet` is handled by the builders through timm's and smp's own loaders
(see `thalia_ray.models.pretrained`); a path is a local state-dict file, loaded here with its first
convolution adapted to the input channels; `run:<RUN_ID>` needs the experiment store and is
resolved by `thalia_ray.train.evaluate.model_from_config`, which then calls `load_weights`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from thalia_ray.config import ConfigError, ModelConfig
from thalia_ray.ids import run_reference
from thalia_ray.models.heads import MultiHeadModel
from thalia_ray.models.pretrained import IMAGENET, check_imagenet_available, weights_file
from thalia_ray.models.registry import check_model_name

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, in_channels: int, time_steps: int, num_classes: int = 2) -> MultiHeadModel:
    """The model named by `cfg.name` for input (B, in_channels, H, W), in_channels = T·C.

    `forward(x)` returns `{"logits": ..., <aux head>: ...}`; see `thalia_ray.models.heads`.
    """
    if time_steps < 1 or in_channels < 1 or in_channels % time_steps:
        raise ConfigError(
            f"in_channels ({in_channels}) must be a positive multiple of time_steps ({time_steps}): "
            "the input stacks T time steps of C channels"
        )
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    spec = check_model_name(cfg.task, cfg.name)
    if cfg.pretrained == IMAGENET:
        check_imagenet_available(spec, cfg.encoder)
    builder = spec.resolve()
    model = builder(spec, cfg, in_channels, num_classes, time_steps, in_channels // time_steps)
    if run_reference(cfg.pretrained) is not None:
        raise ValueError(f"model.pretrained {cfg.pretrained!r} names a stored run: build the model with "
                         "thalia_ray.train.evaluate.model_from_config, which reads the experiment store")
    if cfg.pretrained not in (None, IMAGENET):
        report = load_pretrained(model, cfg.pretrained)
        log.info("model.pretrained %s: %s", cfg.pretrained, report.summary())
    if cfg.linear_probe:
        frozen = model.freeze_encoder(1.0, statistics=True)
        log.info("model.linear_probe: all %d encoder layers frozen, normalisation statistics too", frozen)
    elif cfg.freeze_encoder:
        frozen = model.freeze_encoder(cfg.freeze_encoder)
        log.info("model.freeze_encoder %s: %d of %d encoder layers frozen",
                 cfg.freeze_encoder, frozen, len(model.encoder_layers()))
    return model


@dataclass
class LoadReport:
    """What `load_pretrained` did, so a partial load is visible rather than silent."""

    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # first convolutions re-fitted to new channel counts
    skipped: list[str] = field(default_factory=list)  # present in both but of another shape
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        for label, keys in (
            ("adapted to the input channels", self.adapted),
            ("skipped (shape differs)", self.skipped),
            ("missing from the file", self.missing),
            ("unexpected in the file", self.unexpected),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return "; ".join(parts)


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local state dict into `model` (or into its timm/smp network when the keys fit that).

    Convolution weights that differ only in input channels (a 3-channel ImageNet stem for a T·C
    input) are adapted; other shape mismatches are skipped and reported. Raises when the file is
    not a state dict or when no tensor matches at all.
    """
    state = torch.load(weights_file(str(path)), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return load_weights(model, state, f"model.pretrained {str(path)!r}")


def load_weights(model: nn.Module, state: object, source: str) -> LoadReport:
    """Load the tensors of `state` that fit `model` (see `load_pretrained`); `source` names it in errors."""
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{source} does not hold a state dict of tensors")
    target = _best_target(model, state)
    report = _match(target.state_dict(), state)
    if not report.loaded and not report.adapted:
        raise ConfigError(f"{source}: no tensor matches the model ({report.summary()})")
    target.load_state_dict(_merged(target.state_dict(), state, report), strict=True)
    return report


def _best_target(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """The model itself or the part of it whose keys `state` shares most: the wrapped network
    (`backbone`, `net`) for a timm or smp state dict, a segmenter's encoder (`net.encoder`) for a
    pretrained backbone's. The model wins ties."""
    return max((m for _, m in model.named_modules()),
               key=lambda m: len(state.keys() & m.state_dict(keep_vars=True).keys()))


def _match(own: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> LoadReport:
    report = LoadReport(
        missing=sorted(own.keys() - state.keys()), unexpected=sorted(state.keys() - own.keys())
    )
    for key in sorted(own.keys() & state.keys()):
        if own[key].shape == state[key].shape:
            report.loaded.append(key)
        elif _adaptable(own[key], state[key]):
            report.adapted.append(key)
        else:
            report.skipped.append(key)
    return report


def _merged(own: Mapping[str, Tensor], state: Mapping[str, Tensor], report: LoadReport) -> dict[str, Tensor]:
    merged = dict(own)
    merged.update({k: state[k] for k in report.loaded})
    merged.update({k: adapt_input_conv(state[k], own[k].shape[1]) for k in report.adapted})
    return merged


def _adaptable(own: Tensor, loaded: Tensor) -> bool:
    same_filters = own.shape[0] == loaded.shape[0] and own.shape[2:] == loaded.shape[2:]
    return own.ndim == loaded.ndim == 4 and same_filters


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Re-fit a conv weight (O, I, kh, kw) to `in_channels` inputs.

    The pretrained filters are tiled over the new channels and rescaled by I / in_channels, so that
    an input whose channels all look alike yields activations of the same magnitude as before.
    """
    old = weight.shape[1]
    reps = -(-in_channels // old)
    tiled = weight.repeat(1, reps, 1, 1)[:, :in_channels]
    return tiled * (old / in_channels)
