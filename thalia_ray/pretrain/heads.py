"""Pretext heads: multi-modal targets after MMEarth, geography and season after Phileo.

- Dense heads (`coherence`, `dem`) regress the named variables' maps from the encoder's feature map,
  at its resolution (the targets average-pooled to it). With the MAE the decoder reconstructs them
  instead, patch by patch, as MMEarth's multi-modal MAE does.
- `era5`: the crop means of the six ERA5 channels of every member (water vapour, surface pressure and
  temperature integral at both dates), regressed from the pooled features.
- `day_of_year`: the (sin, cos) encoding of every acquisition date of the series (`geo.day_of_year_encoding`).
- `location`: the frame's position on the sphere, as a mixture of von Mises–Fisher densities over
  fixed centres spread on the sphere, with learnt concentrations; the head predicts the mixture
  weights and the loss is the negative log density of the true position. Frames without a position
  in the volcano table are left out of the loss.
- `frame`: which of the planned frames the crop comes from (cross-entropy).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thalia_ray.pretrain.geo import sphere_points

DENSE_HEADS = ("coherence", "dem")
INITIAL_KAPPA = 50.0  # concentration of each mixture component at the start (≈ 8° of spread)


def vmf_log_density(y: Tensor, centres: Tensor, log_kappa: Tensor) -> Tensor:
    """log vMF(y; μᵢ, κᵢ) on the unit sphere S², for y (B, 3) and M centres (M, 3): (B, M).

    vMF(y; μ, κ) = κ / (4π sinh κ) · exp(κ μᵀy). Written as log κ − log 2π − log(1 − e^(−2κ)) + κ(μᵀy − 1),
    which neither overflows for large κ nor loses precision for small κ."""
    kappa = log_kappa.exp()
    normaliser = log_kappa - math.log(2 * math.pi) - torch.log1p(-torch.exp(-2 * kappa))
    return normaliser + kappa * (y @ centres.T - 1)


def mvmf_nll(logits: Tensor, y: Tensor, centres: Tensor, log_kappa: Tensor) -> Tensor:
    """Per-sample −log Σᵢ Γᵢ vMF(y; μᵢ, κᵢ), with mixture weights Γ = softmax(logits)."""
    return -torch.logsumexp(F.log_softmax(logits, dim=1) + vmf_log_density(y, centres, log_kappa), dim=1)


class LocationHead(nn.Module):
    def __init__(self, dim: int, components: int) -> None:
        super().__init__()
        self.weights = nn.Linear(dim, components)
        self.register_buffer("centres", torch.as_tensor(sphere_points(components), dtype=torch.float32))
        self.log_kappa = nn.Parameter(torch.full((components,), math.log(INITIAL_KAPPA)))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.weights(pooled)

    def loss(self, logits: Tensor, position: Tensor, known: Tensor) -> Tensor:
        nll = mvmf_nll(logits, position, self.centres, self.log_kappa)
        return (nll * known).sum() / known.sum().clamp(min=1.0)


class PretextHeads(nn.Module):
    """The weighted heads that read the pooled features and, for the dense ones, the feature map."""

    def __init__(self, dim: int, weights: Mapping[str, float], steps: int, era5_planes: int, frames: int,
                 components: int, dense_in_decoder: bool) -> None:
        super().__init__()
        self.weights = {name: w for name, w in weights.items() if w}
        dense = {"coherence": steps, "dem": 1}
        self.dense = nn.ModuleDict({name: nn.Conv2d(dim, planes, 1) for name, planes in dense.items()
                                    if name in self.weights and not dense_in_decoder})
        sizes = {"era5": era5_planes, "day_of_year": 2 * (steps + 1), "frame": frames}
        self.global_heads = nn.ModuleDict({name: nn.Linear(dim, size) for name, size in sizes.items()
                                           if name in self.weights})
        self.location = LocationHead(dim, components) if "location" in self.weights else None

    def losses(self, pooled: Tensor, feature_map: Tensor | None, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each head's loss. `targets`: dense maps by head name (B, planes, H, W), `era5` (B, planes),
        `day_of_year` (B, T + 1, 2), `frame` (B,), `position` (B, 3), `has_position` (B,)."""
        out: dict[str, Tensor] = {}
        for name, head in self.dense.items():
            predicted = head(feature_map)
            out[name] = F.mse_loss(predicted, F.adaptive_avg_pool2d(targets[name], predicted.shape[-2:]))
        for name, head in self.global_heads.items():
            predicted = head(pooled)
            if name == "frame":
                out[name] = F.cross_entropy(predicted, targets["frame"])
            else:
                out[name] = F.mse_loss(predicted, targets[name].flatten(1))
        if self.location is not None:
            out["location"] = self.location.loss(self.location(pooled), targets["position"], targets["has_position"])
        return out
