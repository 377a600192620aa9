"""timm image classifiers with time stacked into channels: (B, T·C, H, W) → class logits."""
from __future__ import annotations

from typing import Iterable

import timm
from torch import Tensor, nn

from thalia_ray.config import ModelConfig
from thalia_ray.models.heads import MultiHeadModel
from thalia_ray.models.pretrained import IMAGENET, imagenet_weights
from thalia_ray.models.registry import ModelSpec

# Vision transformers are created for 224 px; these let them take any crop (position embeddings are
# interpolated to the patch grid and the input is padded to a multiple of the patch size).
_VIT_KWARGS = {"dynamic_img_size": True, "dynamic_img_pad": True}


class TimmClassifier(MultiHeadModel):
    """A timm backbone whose pre-logit features also feed the auxiliary heads."""

    def __init__(
        self, name: str, backbone: nn.Module, in_channels: int, aux_heads: Iterable[str], dropout: float
    ) -> None:
        feature_dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        super().__init__(name, in_channels, feature_dim, aux_heads, dropout)
        self.backbone = backbone

    def encoder_layers(self) -> list[nn.Module]:
        """The backbone's top-level layers, input first, without the classifier."""
        classifier = self.backbone.get_classifier()
        return [m for m in self.backbone.children() if not any(c is classifier for c in m.modules())]

    def encoder_own_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters(recurse=False))

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return self.backbone.forward_head(features), pooled


def build_timm_classifier(
    spec: ModelSpec,
    cfg: ModelConfig,
    in_channels: int,
    num_classes: int,
    time_steps: int,
    channels_per_step: int,
) -> TimmClassifier:
    """A timm model, with timm's ImageNet weights (stem adapted to `in_channels`) when model.pretrained is imagenet."""
    imagenet = cfg.pretrained == IMAGENET
    with imagenet_weights(spec, cfg.encoder, enabled=imagenet):
        backbone = timm.create_model(
            spec.arch,
            pretrained=imagenet,
            in_chans=in_channels,
            num_classes=num_classes,
            drop_rate=cfg.dropout,
            **backbone_kwargs(spec),
        )
    return TimmClassifier(spec.name, backbone, in_channels, cfg.aux_heads, cfg.dropout)


def backbone_kwargs(spec: ModelSpec) -> dict[str, bool]:
    """What `timm.create_model` needs beyond the name so the backbone takes our crops; pretraining builds
    its encoders with the same, so their weights load into these classifiers key for key."""
    return _VIT_KWARGS if spec.family == "vit" else {}
