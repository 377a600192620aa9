"""Self-supervised methods: a masked autoencoder for ViT backbones, SimCLR and BYOL for the others.

Written here in a few hundred lines rather than taken from `lightly`: lightly needs PyTorch Lightning
and Hydra, and its Hydra cannot be installed beside the project's pinned dependencies (hydra-core pins
antlr4 4.9, the project 4.13), and each method is a loss and a few layers around the backbone.

- `MaskedAutoencoder` (He et al., 2022): the ViT encodes a random quarter of the patches (by default),
  a small transformer decoder reconstructs every masked patch of the target planes; the loss is the
  mean squared error over masked patches, per group of planes (the phase, as cos/sin, with the other
  input channels; and each multi-modal target, after MMEarth).
- `SimCLR` (Chen et al., 2020): two views, a projection MLP, the normalised-temperature cross-entropy
  with the other samples of the batch, on every rank, as negatives.
- `BYOL` (Grill et al., 2020): an online network with a predictor regresses a slowly moving average
  of itself (the target network, updated after each optimiser step) across two views; no negatives.

Every method keeps its backbone in `encoder.backbone`: a plain timm model built as the classifiers
build theirs, so fine-tuning loads its weights key for key.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from thalia_ray.config import ConfigError


class Encoder(nn.Module):
    """A timm backbone with a uniform face: its spatial feature map (B, C, h, w), for CNNs and ViTs alike,
    and its pooled features (what the classifier's head reads)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.dim = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.is_vit = hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        return self.feature_map(features, x.shape[-2:]), pooled

    def feature_map(self, features: Tensor, size: torch.Size) -> Tensor:
        if not self.is_vit:
            return features
        patch = self.patch_size
        rows, cols = math.ceil(size[0] / patch), math.ceil(size[1] / patch)
        tokens = features[:, self.backbone.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(len(tokens), -1, rows, cols)

    @property
    def patch_size(self) -> int:
        return int(self.backbone.patch_embed.patch_size[0])


def build_encoder(arch: str, in_channels: int, **kwargs: bool) -> Encoder:
    """A timm backbone without a classifier (`num_classes=0`)."""
    return Encoder(timm.create_model(arch, pretrained=False, in_chans=in_channels, num_classes=0, **kwargs))


@dataclass
class MethodOutput:
    """A method's losses (by name) and the features the pretext heads read (one view's)."""

    losses: dict[str, Tensor]
    pooled: Tensor
    feature_map: Tensor | None = None  # None: the method predicts the dense targets itself (MAE)
    extra: dict[str, Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ MAE
def sincos_positions(rows: int, cols: int, dim: int, device: torch.device) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings (rows·cols, dim) for any grid: half the dimensions encode
    the row, half the column, each at geometrically spaced frequencies."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    r, c = torch.meshgrid(torch.arange(rows, device=device, dtype=torch.float32),
                          torch.arange(cols, device=device, dtype=torch.float32), indexing="ij")
    parts = [f(v.reshape(-1, 1) * omega) for v in (r, c) for f in (torch.sin, torch.cos)]
    embedding = torch.cat(parts, dim=1)
    return F.pad(embedding, (0, dim - embedding.shape[1]))


def patchify(planes: Tensor, patch: int) -> Tensor:
    """(B, P, H, W) → (B, N, P·patch²), patches in row-major order."""
    count, channels, height, width = planes.shape
    grid = planes.reshape(count, channels, height // patch, patch, width // patch, patch)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(count, (height // patch) * (width // patch), -1)


def unpatchify(patches: Tensor, patch: int, channels: int, rows: int, cols: int) -> Tensor:
    count = patches.shape[0]
    grid = patches.reshape(count, rows, cols, channels, patch, patch)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(count, channels, rows * patch, cols * patch)


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ViT. `groups` names the target planes' groups in order with their plane counts
    (e.g. {"mae": 2, "coherence": 1}): each group's loss is reported on its own."""

    def __init__(self, encoder: Encoder, groups: dict[str, int], mask_ratio: float, decoder_dim: int,
                 decoder_depth: int) -> None:
        super().__init__()
        if not encoder.is_vit:
            raise ConfigError("pretrain.method 'mae' needs a ViT backbone (model.name vit_tiny, vit_small or another "
                              "timm ViT); for CNN backbones use simclr or byol")
        from timm.models.vision_transformer import Block

        self.encoder, self.groups, self.mask_ratio = encoder, dict(groups), mask_ratio
        self.patch = encoder.patch_size
        planes = sum(groups.values())
        self.embed = nn.Linear(encoder.backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        heads = max(1, decoder_dim // 32)
        self.blocks = nn.Sequential(*(Block(decoder_dim, heads, mlp_ratio=4.0) for _ in range(decoder_depth)))
        self.norm = nn.LayerNorm(decoder_dim)
        self.predict = nn.Linear(decoder_dim, self.patch * self.patch * planes)
        nn.init.normal_(self.mask_token, std=0.02)

    def masking(self, count: int, patches: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(kept patch indices (B, keep), masked flags (B, N)) of a fresh random masking per sample."""
        keep = max(1, int(round(patches * (1 - self.mask_ratio))))
        order = torch.rand(count, patches, device=device).argsort(dim=1)
        kept = order[:, :keep]
        masked = torch.ones(count, patches, dtype=torch.bool, device=device)
        masked.scatter_(1, kept, False)
        return kept, masked

    def encode(self, image: Tensor, kept: Tensor | None = None) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """(visible tokens after the encoder incl. prefix tokens, pooled features, patch grid)."""
        vit = self.encoder.backbone
        x = vit.patch_embed(image)
        rows, cols = x.shape[1:3]
        x = vit._pos_embed(x)  # timm's (private) embedding of a dynamic-size grid; timm is pinned in constraints.txt
        prefix, tokens = x[:, :vit.num_prefix_tokens], x[:, vit.num_prefix_tokens:]
        if kept is not None:
            tokens = torch.gather(tokens, 1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
        x = vit.norm(vit.blocks(vit.norm_pre(torch.cat([prefix, tokens], dim=1))))
        return x, vit.forward_head(x, pre_logits=True), (rows, cols)

    def decode(self, latent: Tensor, kept: Tensor, grid: tuple[int, int]) -> Tensor:
        """Predicted patches (B, N, patch²·planes) from the visible tokens' latents."""
        rows, cols = grid
        visible = self.embed(latent[:, self.encoder.backbone.num_prefix_tokens:])
        tokens = self.mask_token.expand(len(latent), rows * cols, -1).clone()
        tokens.scatter_(1, kept[..., None].expand(-1, -1, tokens.shape[-1]), visible)
        tokens = tokens + sincos_positions(rows, cols, tokens.shape[-1], tokens.device)
        return self.predict(self.norm(self.blocks(tokens)))

    def check_size(self, height: int, width: int) -> None:
        if height % self.patch or width % self.patch:
            raise ConfigError(f"pretrain.method 'mae': data.crop {height} must be a multiple of the ViT's patch "
                              f"size {self.patch}")

    def forward(self, image: Tensor, target: Tensor) -> MethodOutput:
        """Losses per group on the masked patches of `target` (B, planes, H, W)."""
        self.check_size(*image.shape[-2:])
        rows, cols = image.shape[-2] // self.patch, image.shape[-1] // self.patch
        kept, masked = self.masking(len(image), rows * cols, image.device)
        latent, pooled, grid = self.encode(image, kept)
        predicted = self.decode(latent, kept, grid)
        losses, start = {}, 0
        for name, planes in self.groups.items():
            part = slice(start * self.patch ** 2, (start + planes) * self.patch ** 2)
            error = ((predicted[..., part] - patchify(target[:, start:start + planes], self.patch)) ** 2).mean(-1)
            losses[name] = (error * masked).sum() / masked.sum()
            start += planes
        return MethodOutput(losses, pooled, extra={"predicted": predicted, "masked": masked})

    @torch.no_grad()
    def reconstruct(self, image: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction of every target plane (B, planes, H, W) with the visible patches as given and the
        masked ones predicted, the per-pixel mask (B, H, W): 1 where a patch was hidden from the encoder)."""
        out = self.forward(image, target)
        rows, cols = image.shape[-2] // self.patch, image.shape[-1] // self.patch
        planes = target.shape[1]
        predicted = unpatchify(out.extra["predicted"], self.patch, planes, rows, cols)
        mask = out.extra["masked"].reshape(-1, rows, cols).float()
        pixels = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2)
        return pixels[:, None] * predicted + (1 - pixels[:, None]) * target, pixels


# ------------------------------------------------------------------------------------ two views
def projection_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


def gather_with_gradients(values: Tensor) -> Tensor:
    """Every rank's rows, in rank order; gradients flow back to each rank's own (one rank: the rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(values), dim=0)


def nt_xent(first: Tensor, second: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss: each view must pick its partner among all 2N − 1 other views of the (global) batch."""
    local = len(first)
    offset = local * (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
    z = F.normalize(torch.cat([first, second]), dim=1)
    everyone = F.normalize(torch.cat([gather_with_gradients(first), gather_with_gradients(second)]), dim=1)
    total = len(everyone) // 2
    logits = z @ everyone.T / temperature
    own = torch.cat([torch.arange(local), torch.arange(local) + total]).to(z.device) + offset
    logits = logits.masked_fill(F.one_hot(own, len(everyone)).bool(), float("-inf"))  # not itself
    partners = torch.cat([own[local:], own[:local]])
    return F.cross_entropy(logits, partners)


class SimCLR(nn.Module):
    def __init__(self, encoder: Encoder, projection_dim: int, temperature: float) -> None:
        super().__init__()
        self.encoder, self.temperature = encoder, temperature
        self.projector = projection_head(encoder.dim, encoder.dim, projection_dim)

    def forward(self, first: Tensor, second: Tensor) -> MethodOutput:
        (feature_map, pooled), (_, pooled_2) = self.encoder(first), self.encoder(second)
        loss = nt_xent(self.projector(pooled), self.projector(pooled_2), self.temperature)
        return MethodOutput({"simclr": loss}, pooled, feature_map)


class BYOL(nn.Module):
    def __init__(self, encoder: Encoder, projection_dim: int, momentum: float) -> None:
        super().__init__()
        self.encoder, self.base_momentum = encoder, momentum
        self.projector = projection_head(encoder.dim, 2 * encoder.dim, projection_dim)
        self.predictor = projection_head(projection_dim, 2 * encoder.dim, projection_dim)
        self.target = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)

    def _target(self, view: Tensor) -> Tensor:
        with torch.no_grad():
            return self.target["projector"](self.target["encoder"](view)[1])

    def forward(self, first: Tensor, second: Tensor) -> MethodOutput:
        (feature_map, pooled), (_, pooled_2) = self.encoder(first), self.encoder(second)
        online = [self.predictor(self.projector(p)) for p in (pooled, pooled_2)]
        targets = [self._target(second), self._target(first)]
        loss = sum((2 - 2 * F.cosine_similarity(o, t.detach(), dim=-1)).mean() for o, t in zip(online, targets)) / 2
        return MethodOutput({"byol": loss}, pooled, feature_map)

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Move the target network towards the online one; the rate follows BYOL's cosine schedule from
        `momentum` at the start of training to 1 at its end (`progress` in [0, 1])."""
        tau = 1 - (1 - self.base_momentum) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2
        for online, target in ((self.encoder, self.target["encoder"]), (self.projector, self.target["projector"])):
            for p_online, p_target in zip(online.parameters(), target.parameters()):
                p_target.mul_(tau).add_(p_online.detach(), alpha=1 - tau)
            for b_online, b_target in zip(online.buffers(), target.buffers()):
                b_target.copy_(b_online)
