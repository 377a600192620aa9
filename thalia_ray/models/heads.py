"""Output heads shared by every model family, and the base class that gives them one output contract.

Every model returns a dict: `logits` for the main task plus one entry per auxiliary head. Auxiliary
heads predict annotation attributes from globally pooled encoder features (the deepest features for
segmenters), so they regularise the shared encoder without touching the main decoder.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from thalia_ray.config import ConfigError
from thalia_ray.data import schema

# Fringe flags predicted by the `fringes` head, in output order. `atmospheric_fringes` is a level 0-3
# in the annotations; the head predicts "any atmospheric fringes" (level > 0).
FRINGE_FLAGS = ("glacier_fringes", "orbital_fringes", "atmospheric_fringes", "low_coherence")

# Auxiliary head name → (number of logits, multi-label?). Multi-label heads are trained with binary
# cross-entropy on multi-hot targets, single-label heads with cross-entropy on class indices.
AUX_HEADS: dict[str, tuple[int, bool]] = {
    "activity_type": (len(schema.ACTIVITY_TYPES), True),
    "intensity": (len(schema.INTENSITY_LEVELS), False),
    "phase": (len(schema.PHASES), False),
    "fringes": (len(FRINGE_FLAGS), True),
}


def is_multilabel(head: str) -> bool:
    return _aux_spec(head)[1]


def _aux_spec(head: str) -> tuple[int, bool]:
    try:
        return AUX_HEADS[head]
    except KeyError:
        raise ConfigError(f"unknown auxiliary head {head!r}; available: {', '.join(AUX_HEADS)}") from None


class AuxHeads(nn.Module):
    """One linear layer per requested auxiliary head, on pooled features of size `in_features`."""

    def __init__(self, in_features: int, names: Iterable[str], dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, _aux_spec(name)[0]))
                for name in names
            }
        )

    def forward(self, pooled: Tensor) -> dict[str, Tensor]:
        return {name: head(pooled) for name, head in self.heads.items()}


class MultiHeadModel(nn.Module):
    """Base of every model: input checks, the main prediction and the auxiliary heads.

    Subclasses implement `predict(x) -> (logits, pooled features)`. `input_divisor` is the factor
    that height and width must be multiples of (1 when any size works).
    """

    def __init__(
        self,
        name: str,
        in_channels: int,
        feature_dim: int,
        aux_heads: Iterable[str] = (),
        dropout: float = 0.0,
        input_divisor: int = 1,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_channels = in_channels
        self.input_divisor = input_divisor
        self.aux = AuxHeads(feature_dim, aux_heads, dropout)
        self.fixed_statistics: list[nn.Module] = []  # frozen layers kept in eval mode (see freeze_encoder)

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def encoder_layers(self) -> list[nn.Module]:
        """The encoder's top-level layers, input side first (what `model.freeze_encoder` freezes)."""
        raise NotImplementedError

    def encoder_own_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder outside its layers (a ViT's class token and position embedding),
        frozen with the whole encoder."""
        return []

    def freeze_encoder(self, fraction: float, statistics: bool = False) -> int:
        """Freeze the first `fraction` of the encoder's layers, as the reference does; returns how many.

        Frozen layers keep their weights (no gradient); batch-norm statistics still follow the data,
        unless `statistics` (linear probing): then the frozen layers stay in eval mode when training.
        """
        layers = self.encoder_layers()
        count = int(len(layers) * fraction)
        for layer in layers[:count]:
            layer.requires_grad_(False)
        if count == len(layers):
            for parameter in self.encoder_own_parameters():
                parameter.requires_grad_(False)
        if statistics:
            self.fixed_statistics = layers[:count]
            self.train(self.training)
        return count

    def train(self, mode: bool = True) -> "MultiHeadModel":
        super().train(mode)
        for layer in self.fixed_statistics:
            layer.eval()
        return self

    def check_input_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the crop when this model cannot take it."""
        d = self.input_divisor
        if height % d or width % d:
            raise ConfigError(
                f"model {self.name!r} needs height and width divisible by {d}, got a crop of "
                f"{height}x{width}; choose data.crop as a multiple of {d} "
                f"(e.g. {max(d, round(height / d) * d)})"
            )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"model {self.name!r} expects input (B, {self.in_channels}, H, W) "
                f"(time steps stacked into channels), got {tuple(x.shape)}"
            )
        self.check_input_size(*x.shape[-2:])
        logits, pooled = self.predict(x)
        return {"logits": logits, **self.aux(pooled)}


def global_pool(features: Tensor) -> Tensor:
    """Mean over every axis after the channel axis: (B, C, ...) → (B, C)."""
    return torch.flatten(features, 2).mean(dim=2)
