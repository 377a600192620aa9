"""Views for pretraining that respect InSAR physics, made on the device for a whole batch.

A sample is a stack of planes: its T·C input channels (time-major), then the pretext maps read beside
them. Every geometric transform (a random resized crop, flips, rotations by multiples of 90°) is drawn
once per sample and moves all its planes alike: every channel, every member of a series and the
targets, so that a series stays co-registered and a target stays on its pixels.

Wrapped phase is circular, which rules out what works on photographs:
- it is resampled through (cos φ, sin φ) and turned back with atan2, because interpolating wrapped
  values across a 2π jump invents a phase that no neighbour has;
- a constant offset modulo 2π is allowed (an interferogram's phase is defined up to one: the
  reference point), and noise is added before re-wrapping;
- no brightness or contrast jitter: scaling a phase changes the deformation it encodes. Jitter is
  applied to the other input channels only (coherence, DEM, ERA5) and never to the targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from thalia_ray.config import PretrainAugmentConfig


@dataclass(frozen=True)
class PhasePlanes:
    """Which planes of a stack hold wrapped phase, and the normalisation (mean, std) they were given."""

    indices: tuple[int, ...]
    mean: float = 0.0
    std: float = 1.0

    def radians(self, values: Tensor) -> Tensor:
        return values * self.std + self.mean

    def normalised(self, radians: Tensor) -> Tensor:
        return (radians - self.mean) / self.std


def wrap(radians: Tensor) -> Tensor:
    """Into [-π, π)."""
    return torch.remainder(radians + math.pi, 2 * math.pi) - math.pi


def circular(stack: Tensor, phase: PhasePlanes) -> Tensor:
    """The stack with each phase plane replaced by its (cos φ, sin φ) pair, the others kept in order: a
    representation in which near values are near phases, for resampling and for reconstruction targets."""
    planes = []
    for i in range(stack.shape[1]):
        plane = stack[:, i:i + 1]
        if i in phase.indices:
            angle = phase.radians(plane)
            planes += [torch.cos(angle), torch.sin(angle)]
        else:
            planes.append(plane)
    return torch.cat(planes, dim=1)


def from_circular(expanded: Tensor, phase: PhasePlanes, planes: int) -> Tensor:
    """`circular`'s inverse: (cos, sin) pairs back to normalised wrapped phase."""
    out, j = [], 0
    for i in range(planes):
        if i in phase.indices:
            out.append(phase.normalised(torch.atan2(expanded[:, j + 1:j + 2], expanded[:, j:j + 1])))
            j += 2
        else:
            out.append(expanded[:, j:j + 1])
            j += 1
    return torch.cat(out, dim=1)


def _chance(p: float, count: int, device: torch.device) -> Tensor:
    return torch.rand(count, device=device) < p


class ViewMaker:
    """Draws one augmented view of a batch of stacks (B, planes, H, W); the first `inputs` planes are the
    model's input, the rest pretext targets (moved, never jittered)."""

    def __init__(self, cfg: PretrainAugmentConfig, phase: PhasePlanes, inputs: int) -> None:
        self.cfg, self.phase, self.inputs = cfg, phase, inputs

    def __call__(self, stack: Tensor) -> Tensor:
        view = self.resized_crop(stack)
        view = self.flip_and_rotate(view)
        return self.photometric(view)

    def resized_crop(self, stack: Tensor) -> Tensor:
        """A square crop of a random share of the area, at a random place, resampled to the full size."""
        low, high = self.cfg.crop_scale
        if low >= 1.0:
            return stack
        count, device = stack.shape[0], stack.device
        side = torch.sqrt(torch.empty(count, device=device).uniform_(low, high))
        shift = (torch.rand(count, 2, device=device) * 2 - 1) * (1 - side)[:, None]
        theta = torch.zeros(count, 2, 3, device=device, dtype=stack.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = side
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(stack.shape), align_corners=False)
        sampled = F.grid_sample(circular(stack, self.phase), grid, mode="bilinear", padding_mode="border",
                                align_corners=False)
        return from_circular(sampled, self.phase, stack.shape[1])

    def flip_and_rotate(self, stack: Tensor) -> Tensor:
        count, device = stack.shape[0], stack.device
        shape = (count, 1, 1, 1)
        stack = torch.where(_chance(self.cfg.flip, count, device).view(shape), stack.flip(-1), stack)
        stack = torch.where(_chance(self.cfg.flip, count, device).view(shape), stack.flip(-2), stack)
        if stack.shape[-1] != stack.shape[-2]:
            return stack
        turns = torch.randint(1, 4, (count,), device=device) * _chance(self.cfg.rotate90, count, device)
        for k in (1, 2, 3):
            stack = torch.where((turns == k).view(shape), torch.rot90(stack, k, dims=(-2, -1)), stack)
        return stack

    def photometric(self, stack: Tensor) -> Tensor:
        """Phase: a constant offset and noise, re-wrapped. Other input planes: brightness and contrast."""
        count, planes = stack.shape[:2]
        stack = stack.clone()
        cfg, device = self.cfg, stack.device
        for i in self.phase.indices:
            radians = self.phase.radians(stack[:, i])
            offset = torch.empty(count, device=device).uniform_(-math.pi, math.pi) * _chance(cfg.phase_offset, count,
                                                                                               device)
            radians = radians + offset[:, None, None] + cfg.phase_noise * torch.randn_like(radians)
            stack[:, i] = self.phase.normalised(wrap(radians))
        others = [i for i in range(self.inputs) if i not in self.phase.indices]
        if others and cfg.jitter:
            scale = 1 + torch.empty(count, len(others), 1, 1, device=device).uniform_(-cfg.jitter, cfg.jitter)
            shift = torch.empty(count, len(others), 1, 1, device=device).uniform_(-cfg.jitter, cfg.jitter)
            stack[:, others] = stack[:, others] * scale + shift
        return stack
