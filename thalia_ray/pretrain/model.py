"""The pretraining network: a backbone, a self-supervised method around it, the pretext heads and the
view maker, assembled from the configuration; its forward pass takes a batch and returns the losses.

The loss is `pretrain.method_weight` × the method's loss + Σ `pretrain.heads[h]` × head h's loss, and
every term is reported (`train/loss_<name>`, `val/loss_<name>`). With `method: none` the heads train
the backbone on their own (one view, no method loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from thalia_ray.config import ConfigError, ThaliaConfig
from thalia_ray.data import schema
from thalia_ray.models.classifiers import backbone_kwargs
from thalia_ray.models.registry import ModelSpec, get_spec
from thalia_ray.pretrain.augment import PhasePlanes, ViewMaker, circular
from thalia_ray.pretrain.heads import DENSE_HEADS, PretextHeads
from thalia_ray.pretrain.methods import BYOL, SimCLR, MaskedAutoencoder, MethodOutput, build_encoder
from thalia_ray.pretrain.source import TARGET_PREFIX, pretext_variables

PHASE = "insar_difference"
ERA5 = tuple(c for v in schema.ATMOSPHERIC for c in schema.atmospheric_pair(v))


@dataclass(frozen=True)
class DataFacts:
    """What the network needs to know about the data, decided once by the driver: how many frames the
    frame head tells apart, and the normalisation of the phase (to undo it for circular operations)."""

    frames: int
    phase_mean: float = 0.0
    phase_std: float = 1.0


def backbone_spec(cfg: ThaliaConfig) -> ModelSpec:
    spec = get_spec(cfg.model.name)
    if not spec.builder.endswith("build_timm_classifier"):
        raise ConfigError(f"model.name {cfg.model.name!r}: pretraining needs a timm backbone (a classifier of "
                          "`thalia-ray models`, e.g. resnet18, convnext_atto, vit_tiny), whose weights then "
                          "fine-tune classifiers, and segmenters through their encoder")
    return spec


def resolved_method(cfg: ThaliaConfig) -> str:
    """`pretrain.method`, with `auto` resolved: the MAE for ViT backbones, SimCLR for the others."""
    if cfg.pretrain.method != "auto":
        return cfg.pretrain.method
    return "mae" if backbone_spec(cfg).family == "vit" else "simclr"


def phase_planes(cfg: ThaliaConfig, facts: DataFacts) -> PhasePlanes:
    channels = cfg.data.channels
    if PHASE not in channels:
        return PhasePlanes(())
    index = channels.index(PHASE)
    return PhasePlanes(tuple(t * len(channels) + index for t in range(cfg.data.length)), facts.phase_mean,
                       facts.phase_std)


class PretrainModel(nn.Module):
    def __init__(self, cfg: ThaliaConfig, facts: DataFacts) -> None:
        super().__init__()
        spec, pretrain, steps = backbone_spec(cfg), cfg.pretrain, cfg.data.length
        inputs = steps * len(cfg.data.channels)
        self.method_name, self.method_weight = resolved_method(cfg), pretrain.method_weight
        self.phase = phase_planes(cfg, facts)
        self.steps = steps
        self.dense = [h for h in DENSE_HEADS if pretrain.heads.get(h)]
        encoder = build_encoder(spec.arch, inputs, **backbone_kwargs(spec))
        if self.method_name == "mae":
            groups = {"mae": inputs + len(self.phase.indices), **{h: self.dense_planes(h) for h in self.dense}}
            self.method: nn.Module = MaskedAutoencoder(encoder, groups, pretrain.mask_ratio, pretrain.decoder_dim,
                                                       pretrain.decoder_depth)
        elif self.method_name == "simclr":
            self.method = SimCLR(encoder, pretrain.projection_dim, pretrain.temperature)
        elif self.method_name == "byol":
            self.method = BYOL(encoder, pretrain.projection_dim, pretrain.momentum)
        else:
            self.method = encoder
        self.era5 = [v for v in pretext_variables(pretrain.heads) if v in ERA5]
        self.heads = PretextHeads(encoder.dim, pretrain.heads, steps, len(self.era5) * steps, facts.frames,
                                  pretrain.vmf_components, dense_in_decoder=self.method_name == "mae")
        self.views = ViewMaker(pretrain.augment, self.phase, inputs)

    @property
    def encoder(self) -> nn.Module:
        return self.method.encoder if hasattr(self.method, "encoder") else self.method

    def encoder_state(self) -> dict[str, Tensor]:
        """The backbone's weights, keyed as a classifier's backbone is: what fine-tuning loads."""
        return self.encoder.backbone.state_dict()

    def dense_planes(self, head: str) -> int:
        return self.steps if head == "coherence" else 1

    def dense_targets(self, batch: Mapping[str, Any]) -> Tensor:
        """The dense heads' maps, (B, planes, H, W): coherence of every member, then the (static) DEM."""
        maps = {"coherence": lambda: batch[f"{TARGET_PREFIX}insar_coherence"],
                "dem": lambda: batch[f"{TARGET_PREFIX}dem"][:, :1]}
        image = batch["image"]
        return torch.cat([maps[h]() for h in self.dense], dim=1) if self.dense else image[:, :0]

    def global_targets(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        out = {name: batch[name] for name in ("day_of_year", "frame", "position", "has_position")}
        if self.era5:
            out["era5"] = torch.stack([batch[f"{TARGET_PREFIX}{v}"] for v in self.era5], dim=1).mean(dim=(-2, -1))
        return out

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Every loss of the batch by name, and their weighted sum as `total`."""
        image = batch["image"]
        stack = torch.cat([image, self.dense_targets(batch)], dim=1)
        inputs = image.shape[1]
        view = self.views(stack)
        if self.method_name == "mae":
            target = torch.cat([circular(view[:, :inputs], self.phase), view[:, inputs:]], dim=1)
            out = self.method(view[:, :inputs], target)
        elif self.method_name in ("simclr", "byol"):
            out = self.method(view[:, :inputs], self.views(stack)[:, :inputs])
        else:
            feature_map, pooled = self.method(view[:, :inputs])
            out = MethodOutput({}, pooled, feature_map)
        dense = {h: view[:, inputs + start:inputs + start + self.dense_planes(h)]
                 for h, start in zip(self.dense, self._starts())}
        losses = {**out.losses, **self.heads.losses(out.pooled, out.feature_map, {**dense, **self.global_targets(batch)})}
        weights = {self.method_name: self.method_weight, **self.heads.weights}
        total = sum(weights[name] * loss for name, loss in losses.items())
        return {"total": total, **losses}

    def _starts(self) -> list[int]:
        starts, start = [], 0
        for head in self.dense:
            starts.append(start)
            start += self.dense_planes(head)
        return starts

    def after_step(self, progress: float) -> None:
        """After each optimiser step (`progress`: the share of training done): BYOL's target network."""
        if isinstance(self.method, BYOL):
            self.method.update_target(progress)
