"""A small spatio-temporal network that keeps time as its own axis.

Stacking T interferograms into channels lets a 2D network mix time steps only in its first layer.
Here the input (B, T·C, H, W) is unstacked to (B, C, T, H, W) (time-major stacking: channels of step 0
first) and encoded by factorised (2+1)D residual blocks: a spatial 1×3×3 convolution per step, then a
temporal 3×1×1 convolution across steps. Deformation persists across pairs while atmosphere does
not, which is what the temporal convolutions can exploit.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from thalia_ray.config import ModelConfig
from thalia_ray.models.heads import MultiHeadModel, global_pool
from thalia_ray.models.registry import ModelSpec

WIDTHS = (16, 32, 64, 128)  # channels of the four stages; each halves height and width
DECODER_WIDTH = 32


class FactorisedBlock(nn.Module):
    """Residual (2+1)D block: spatial conv (strided over H, W) then temporal conv, BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.temporal = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(out_channels),
        )
        self.shortcut = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1, (1, stride, stride), bias=False),
            nn.BatchNorm3d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.temporal(self.spatial(x)) + self.shortcut(x))


class FactorisedEncoder(nn.Module):
    """Four (2+1)D stages; returns every stage's features, (B, width, T, H/2^k, W/2^k)."""

    def __init__(self, in_channels: int, widths: Sequence[int] = WIDTHS) -> None:
        super().__init__()
        ins = (in_channels, *widths[:-1])
        self.stages = nn.ModuleList(FactorisedBlock(i, o, stride=2) for i, o in zip(ins, widths))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ClassificationHead(nn.Module):
    def __init__(self, widths: Sequence[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1], num_classes))

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        return self.fc(global_pool(features[-1]))


class SegmentationDecoder(nn.Module):
    """Light FPN-style decoder on time-averaged stage features, upsampled to the input size.

    Each level is resized to the next one's exact size, so any height and width work.
    """

    def __init__(self, widths: Sequence[int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(w, DECODER_WIDTH, 1) for w in widths)
        self.fuse = nn.Sequential(
            nn.Conv2d(DECODER_WIDTH, DECODER_WIDTH, 3, padding=1, bias=False),
            nn.BatchNorm2d(DECODER_WIDTH),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classify = nn.Conv2d(DECODER_WIDTH, num_classes, 1)

    def forward(self, features: list[Tensor], size: tuple[int, int]) -> Tensor:
        maps = [lateral(f.mean(dim=2)) for lateral, f in zip(self.lateral, features)]
        x = maps[-1]
        for skip in reversed(maps[:-1]):
            x = skip + F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.classify(self.fuse(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SpatioTemporalNet(MultiHeadModel):
    def __init__(
        self,
        name: str,
        task: str,
        time_steps: int,
        channels_per_step: int,
        num_classes: int,
        aux_heads: Sequence[str],
        dropout: float,
    ) -> None:
        super().__init__(name, time_steps * channels_per_step, WIDTHS[-1], aux_heads, dropout)
        self.time_steps = time_steps
        self.channels_per_step = channels_per_step
        self.encoder = FactorisedEncoder(channels_per_step)
        head = ClassificationHead if task == "classification" else SegmentationDecoder
        self.head = head(WIDTHS, num_classes, dropout)

    def encoder_layers(self) -> list[nn.Module]:
        return list(self.encoder.stages)

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        cube = x.reshape(b, self.time_steps, self.channels_per_step, h, w).transpose(1, 2)
        features = self.encoder(cube)
        return self.head(features, (h, w)), global_pool(features[-1])


def build_spatiotemporal(
    spec: ModelSpec,
    cfg: ModelConfig,
    in_channels: int,
    num_classes: int,
    time_steps: int,
    channels_per_step: int,
) -> SpatioTemporalNet:
    return SpatioTemporalNet(
        spec.name, cfg.task, time_steps, channels_per_step, num_classes, list(cfg.aux_heads), cfg.dropout
    )
