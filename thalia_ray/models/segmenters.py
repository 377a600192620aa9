"""segmentation-models-pytorch segmenters, time stacked into channels: (B, T·C, H, W) → pixel logits."""
from __future__ import annotations

from typing import Iterable

import segmentation_models_pytorch as smp
from torch import Tensor, nn

from thalia_ray.config import ConfigError, ModelConfig
from thalia_ray.models.heads import MultiHeadModel, global_pool
from thalia_ray.models.pretrained import IMAGENET, imagenet_weights
from thalia_ray.models.registry import ModelSpec


class SmpSegmenter(MultiHeadModel):
    """An smp model run step by step so that the deepest encoder features also feed the aux heads."""

    def __init__(
        self, name: str, net: nn.Module, in_channels: int, aux_heads: Iterable[str], dropout: float
    ) -> None:
        # smp models that need it check the size against the encoder's output stride; doing the check
        # ourselves gives a message that names the crop and the configuration key.
        divisor = net.encoder.output_stride if net.requires_divisible_input_shape else 1
        super().__init__(name, in_channels, net.encoder.out_channels[-1], aux_heads, dropout, divisor)
        self.net = net
        self.dropout = nn.Dropout(dropout)

    def encoder_layers(self) -> list[nn.Module]:
        return list(self.net.encoder.children())

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.net.encoder(x)
        decoded = self.dropout(self.net.decoder(features))
        return self.net.segmentation_head(decoded), global_pool(features[-1])


def build_smp_segmenter(
    spec: ModelSpec,
    cfg: ModelConfig,
    in_channels: int,
    num_classes: int,
    time_steps: int,
    channels_per_step: int,
) -> SmpSegmenter:
    """An smp model with encoder `cfg.encoder`; smp's ImageNet encoder weights (stem adapted to
    `in_channels`) when model.pretrained is imagenet (`tu-` encoders: timm's default pretrained tag)."""
    imagenet = cfg.pretrained == IMAGENET
    weights = (True if cfg.encoder.startswith("tu-") else IMAGENET) if imagenet else None
    try:
        with imagenet_weights(spec, cfg.encoder, enabled=imagenet):
            net = smp.create_model(
                spec.arch,
                encoder_name=cfg.encoder,
                encoder_weights=weights,
                in_channels=in_channels,
                classes=num_classes,
            )
    except (KeyError, ValueError) as err:
        reason = err.args[0] if err.args else err
        raise ConfigError(f"model.encoder {cfg.encoder!r} cannot be used with {spec.name}: {reason}") from None
    return SmpSegmenter(spec.name, net, in_channels, cfg.aux_heads, cfg.dropout)
