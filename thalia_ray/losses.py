"""Training objectives: the main task loss plus weighted auxiliary-head losses.

`build_loss` returns a callable `(outputs, batch) -> (total, components)` where `outputs` is a
model's dict (see `thalia_ray.models.heads`) and `batch` the data pipeline's dict.

Weighting: every element (sample, or pixel for segmentation) gets weight
`class_weights[target] × confidence (when confidence_weighting)`, and a loss is the weighted mean
`Σ w·l / Σ w`. With uniform weights this is the plain mean; with class weights it matches
`F.cross_entropy(weight=...)`.

Missing auxiliary labels: single-label targets (`aux_intensity`, `aux_phase`) use -1 for "missing";
multi-hot targets (`aux_activity_type`, `aux_fringes`) come with an optional float (B,) key
`aux_<head>_valid` (1 labelled, 0 missing; all samples count as labelled when the key is absent).
Missing samples get weight 0; a batch without any labelled sample contributes 0 for that head.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from thalia_ray.config import ConfigError, LossConfig
from thalia_ray.data.transforms import segmentation_target
from thalia_ray.models.heads import is_multilabel

LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], tuple[Tensor, dict[str, float]]]

MISSING = -1  # single-label auxiliary targets use this for "no label"
DICE_SMOOTH = 1.0  # keeps Dice defined (and = 1 when empty) on crops without deformation
_EPS = 1e-12


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Σ w·v / Σ w; 0 (still in the graph) when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp_min(_EPS)


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Unreduced cross-entropy over the class axis 1, for (B, K) or (B, K, H, W) logits."""
    return F.cross_entropy(logits.float(), target, reduction="none")


def focal(logits: Tensor, target: Tensor, gamma: float, alpha: Tensor | None, form: str = "standard") -> Tensor:
    """Unreduced focal loss −α_t (1 − p_t)^γ log p_t, α_t = `alpha[target]` (1 when `alpha` is None).

    `form` "standard" differentiates through the modulating factor (1 − p_t)^γ; "reference" detaches it,
    as the reference's FocalLoss does, so that the gradient is (1 − p_t)^γ times that of −α_t log p_t:
    the same values, but easy examples (p_t near 1) get up to 1 + γ times less weight than in "standard".
    """
    if form not in ("standard", "reference"):
        raise ValueError(f"unknown focal form {form!r}; expected standard or reference")
    log_p = -cross_entropy(logits, target)
    p_t = log_p.detach().exp() if form == "reference" else log_p.exp()
    loss = -(1.0 - p_t).pow(gamma) * log_p
    return loss if alpha is None else alpha.to(loss.device)[target] * loss


def dice(logits: Tensor, target: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """Per-sample soft Dice loss 1 − mean_k Dice_k on softmax probabilities; (B, K, H, W) → (B,)."""
    probs = logits.float().softmax(dim=1).flatten(2)
    onehot = F.one_hot(target.flatten(1), logits.shape[1]).transpose(1, 2).to(probs.dtype)
    overlap = (probs * onehot).sum(dim=2)
    total = probs.sum(dim=2) + onehot.sum(dim=2)
    score = (2 * overlap + DICE_SMOOTH) / (total + DICE_SMOOTH)  # (B, K)
    if class_weights is None:
        return 1.0 - score.mean(dim=1)
    return 1.0 - (score * class_weights).sum(dim=1) / class_weights.sum()


class ThaliaLoss:
    """Main loss (ce / focal / dice and their sums) plus weighted auxiliary losses."""

    def __init__(self, cfg: LossConfig, task: str, aux_weights: Mapping[str, float] | None = None) -> None:
        if task not in ("classification", "segmentation"):
            raise ValueError(f"unknown task {task!r}; expected classification or segmentation")
        self.terms = cfg.name.split("+")
        if "dice" in self.terms and task != "segmentation":
            raise ConfigError(f"train.loss.name {cfg.name!r} uses Dice, which needs task segmentation")
        self.cfg = cfg
        self.task = task
        self.aux_weights = dict(aux_weights or {})
        for head in self.aux_weights:
            is_multilabel(head)  # validates the name
        self.class_weights = None if cfg.class_weights is None else torch.tensor(cfg.class_weights)
        self.focal_alpha = None if cfg.focal_alpha is None else torch.tensor(cfg.focal_alpha)

    def __call__(
        self, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        logits = _get(outputs, "logits", "model outputs")
        target = self._target(batch)
        class_weights = self._class_weights(logits)
        sample_weights = self._sample_weights(batch, logits)
        parts: dict[str, Tensor] = {}
        for term in self.terms:
            parts[term] = self._main_term(term, logits, target, class_weights, sample_weights)
        total = sum(parts.values())
        for head, weight in self.aux_weights.items():
            parts[f"aux_{head}"] = self._aux_term(head, outputs, batch, sample_weights)
            total = total + weight * parts[f"aux_{head}"]
        components = {name: float(value.detach()) for name, value in parts.items()}
        components["total"] = float(total.detach())
        return total, components

    def _target(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.task == "classification":
            return _get(batch, "label", "batch").long()
        return segmentation_target(_get(batch, "mask", "batch")).long()

    def _class_weights(self, logits: Tensor) -> Tensor | None:
        if self.class_weights is None:
            return None
        if len(self.class_weights) != logits.shape[1]:
            raise ConfigError(
                f"train.loss.class_weights has {len(self.class_weights)} values for {logits.shape[1]} classes"
            )
        return self.class_weights.to(logits.device)

    def _sample_weights(self, batch: Mapping[str, Tensor], logits: Tensor) -> Tensor:
        if not self.cfg.confidence_weighting:
            return torch.ones(logits.shape[0], device=logits.device)
        return _get(batch, "confidence", "batch").float().to(logits.device)

    def _main_term(
        self, term: str, logits: Tensor, target: Tensor, class_weights: Tensor | None, sample_weights: Tensor
    ) -> Tensor:
        if term == "dice":
            return weighted_mean(dice(logits, target, class_weights), sample_weights)
        if term == "ce":
            per_element = cross_entropy(logits, target)
        else:
            per_element = focal(logits, target, self.cfg.focal_gamma, self.focal_alpha, self.cfg.focal_form)
        weights = _broadcast(sample_weights, per_element)
        if class_weights is not None:
            weights = weights * class_weights[target]
        return weighted_mean(per_element, weights)

    def _aux_term(
        self, head: str, outputs: Mapping[str, Tensor], batch: Mapping[str, Tensor], sample_weights: Tensor
    ) -> Tensor:
        logits = _get(outputs, head, "model outputs", hint=" (is it in model.aux_heads?)").float()
        target = _get(batch, f"aux_{head}", "batch")
        if is_multilabel(head):
            valid = batch.get(f"aux_{head}_valid")
            valid = torch.ones_like(sample_weights) if valid is None else valid.float()
            bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            per_sample = bce.mean(dim=1)
        else:
            valid = (target != MISSING).float()
            per_sample = F.cross_entropy(logits, target.long(), ignore_index=MISSING, reduction="none")
        return weighted_mean(per_sample, valid.to(sample_weights.device) * sample_weights)


def _broadcast(sample_weights: Tensor, per_element: Tensor) -> Tensor:
    """(B,) sample weights expanded to a (B, ...) per-element loss."""
    return sample_weights.reshape(-1, *([1] * (per_element.ndim - 1))).expand_as(per_element)


def _get(mapping: Mapping[str, Tensor], key: str, where: str, hint: str = "") -> Tensor:
    try:
        return mapping[key]
    except KeyError:
        raise KeyError(f"{where} has no {key!r}{hint}; keys present: {sorted(mapping)}") from None


def build_loss(cfg: LossConfig, task: str, aux_weights: Mapping[str, float] | None = None) -> LossFn:
    """The loss for `task`; `aux_weights` is `ModelConfig.aux_heads` (head name → weight)."""
    return ThaliaLoss(cfg, task, aux_weights)
