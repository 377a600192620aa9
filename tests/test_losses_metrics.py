"""Losses against hand-computed values; metrics against direct numpy computations, alone and under DDP."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from thalia_ray.bench.s3server import free_port
from thalia_ray.config import LossConfig
from thalia_ray.losses import build_loss
from torchmetrics.classification import MulticlassAveragePrecision

from thalia_ray.metrics import MetricSuite, curves, subgroup_metrics

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


def _logits_for(scores: np.ndarray) -> torch.Tensor:
    """Two-class logits whose softmax gives `scores` as the Deformation probability."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    return torch.stack([torch.zeros_like(s), torch.log(s / (1 - s))], dim=1).float()


def _confident(mask: torch.Tensor) -> torch.Tensor:
    """Segmentation logits that predict `mask` with probability ~1."""
    return F.one_hot(mask, 2).permute(0, 3, 1, 2).float() * 100.0


# ----------------------------------------------------------------------------------------- losses
def test_focal_with_gamma_0_and_alpha_half_is_half_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, label = torch.randn(8, 2), torch.randint(0, 2, (8,))
    focal = build_loss(LossConfig(name="focal", focal_gamma=0, focal_alpha=[0.5, 0.5]), "classification")
    ce = build_loss(LossConfig(name="ce"), "classification")
    batch = {"label": label}
    torch.testing.assert_close(focal({"logits": logits}, batch)[0], 0.5 * ce({"logits": logits}, batch)[0])
    torch.testing.assert_close(ce({"logits": logits}, batch)[0], F.cross_entropy(logits, label))


def test_focal_hand_computed() -> None:
    # p(Deformation) = 0.75, α = [0.75, 0.25] (the default): positive → 0.25 (1-p)^γ (-log p);
    # negative → 0.75 p^γ (-log(1-p)).
    logits = _logits_for(np.array([0.75, 0.75]))
    loss_fn = build_loss(LossConfig(name="focal", focal_gamma=2), "classification")
    loss, parts = loss_fn({"logits": logits}, {"label": torch.tensor([1, 0])})
    expected = (0.25 * 0.25**2 * -math.log(0.75) + 0.75 * 0.75**2 * -math.log(0.25)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts == {"focal": pytest.approx(expected, rel=1e-5), "total": pytest.approx(expected, rel=1e-5)}


def _reference_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """The reference's FocalLoss(gamma, alpha).forward written out line by line (losses/focal_loss.py):
    (N, C, H, W) logits flattened to (N·H·W, C); log p_t gathered; p_t = exp of its *data*, so the factor
    (1 − p_t)^γ carries no gradient; α = [α, 1 − α] gathered by class; the mean over elements."""
    target = target.unsqueeze(1)
    if logits.dim() > 2:
        logits = logits.view(logits.size(0), logits.size(1), -1).transpose(1, 2).contiguous().view(-1, logits.size(1))
    target = target.contiguous().view(-1, 1)
    logpt = F.log_softmax(logits, dim=1).gather(1, target).view(-1)
    pt = logpt.data.exp()
    at = torch.tensor([alpha, 1 - alpha], dtype=logits.dtype).gather(0, target.data.view(-1))
    logpt = logpt * at
    return (-1 * (1 - pt) ** gamma * logpt).mean()


def _inputs(task: str, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random float32 logits (as models give them) and targets: (8, 2) per sample, or (2, 2, 5, 6) per pixel."""
    torch.manual_seed(seed)
    shape = (8,) if task == "classification" else (2, 5, 6)
    target = torch.randint(0, 2, shape)
    logits = (3 * torch.randn(shape[0], 2, *shape[1:])).requires_grad_()
    return logits, {"label": target} if task == "classification" else {"mask": target}


def _value_and_grad(loss: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_focal_loss_has_the_reference_values_and_gradients(task: str, seed: int) -> None:
    from thalia_ray.config import load_config

    cfg = load_config(PAPER / ("cls-single.yaml" if task == "classification" else "seg-single.yaml"))
    logits, batch = _inputs(task, seed)
    target = batch.get("label", batch.get("mask"))
    ours = _value_and_grad(build_loss(cfg.train.loss, task)({"logits": logits}, batch)[0], logits)
    reference = _value_and_grad(_reference_focal(logits, target, gamma=2, alpha=0.25), logits)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    # The standard form has the same value but differentiates through (1 - p_t)^γ: other gradients.
    standard = cfg.train.loss.model_copy(update={"focal_form": "standard"})
    value, grad = _value_and_grad(build_loss(standard, task)({"logits": logits}, batch)[0], logits)
    torch.testing.assert_close(value, reference[0], rtol=0, atol=1e-6)
    assert (grad - reference[1]).abs().max() > 1e-3 * reference[1].abs().max()


def test_standard_focal_gradient_is_the_reference_one_times_the_factor_of_the_issue() -> None:
    # Per element, d/dz of the standard form = that of the reference form × (1 + γ p (−ln p) / (1 − p)).
    logits, batch = _inputs("classification", 3)
    gamma = 2.0
    per_element = {}
    for form in ("standard", "reference"):
        cfg = LossConfig(name="focal", focal_gamma=gamma, focal_alpha=[0.25, 0.75], focal_form=form)
        per_element[form] = _value_and_grad(build_loss(cfg, "classification")({"logits": logits}, batch)[0], logits)[1]
    p = logits.detach().softmax(dim=1).gather(1, batch["label"][:, None]).squeeze(1)
    factor = 1 + gamma * p * -torch.log(p) / (1 - p)
    torch.testing.assert_close(per_element["standard"], per_element["reference"] * factor[:, None])


def test_focal_alpha_is_a_list_and_a_number_is_refused_showing_both_lists() -> None:
    with pytest.raises(ValueError, match="one focal α per class"):
        LossConfig(focal_alpha=[0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        LossConfig(focal_alpha=[0.5, 1.5])
    with pytest.raises(ValueError, match=r"ambiguous.*\[0\.25, 0\.75\].*\[0\.75, 0\.25\]"):
        LossConfig(focal_alpha=0.25)
    unweighted = build_loss(LossConfig(name="focal", focal_gamma=0, focal_alpha=None), "classification")
    logits, label = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(unweighted({"logits": logits}, {"label": label})[0], F.cross_entropy(logits, label))


def test_a_stored_number_alpha_is_read_as_the_weighting_it_was_trained_with() -> None:
    from thalia_ray.config import upgrade_stored, validate

    stored = {"train": {"loss": {"name": "focal", "focal_alpha": 0.25}}}  # written when a number was the Deformation weight
    assert validate(upgrade_stored(stored)).train.loss.focal_alpha == [0.75, 0.25]


def test_class_weights_match_torch_and_confidence_weights_samples() -> None:
    torch.manual_seed(0)
    logits, label = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    weighted = build_loss(LossConfig(name="ce", class_weights=[0.2, 0.8]), "classification")
    expected = F.cross_entropy(logits, label, weight=torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(weighted({"logits": logits}, {"label": label})[0], expected)

    by_confidence = build_loss(LossConfig(name="ce", confidence_weighting=True), "classification")
    confidence = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    loss, _ = by_confidence({"logits": logits}, {"label": label, "confidence": confidence})
    torch.testing.assert_close(loss, F.cross_entropy(logits[:1], label[:1]))


def test_dice_on_known_masks() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, :] = 1  # 4 deformation pixels
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, 0, :2] = 1
    pred[0, 1, :2] = 1  # 2 of them found, 2 false positives
    dice = build_loss(LossConfig(name="dice"), "segmentation")
    dice_deformation = (2 * 2 + 1) / (4 + 4 + 1)
    dice_background = (2 * 10 + 1) / (12 + 12 + 1)
    loss, _ = dice({"logits": _confident(pred)}, {"mask": target})
    assert loss.item() == pytest.approx(1 - (dice_deformation + dice_background) / 2, abs=1e-5)
    perfect, _ = dice({"logits": _confident(target)}, {"mask": target})
    assert perfect.item() == pytest.approx(0.0, abs=1e-5)
    deformation_only = build_loss(LossConfig(name="dice", class_weights=[0, 1]), "segmentation")
    loss, _ = deformation_only({"logits": _confident(pred)}, {"mask": target})
    assert loss.item() == pytest.approx(1 - dice_deformation, abs=1e-5)


def test_combined_loss_and_mask_union_over_time() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    per_step = torch.zeros(2, 3, 8, 8, dtype=torch.long)
    per_step[0, 0, :2] = 1
    per_step[0, 2, 5:] = 1
    union = per_step.amax(dim=1)
    loss_fn = build_loss(LossConfig(name="focal+dice"), "segmentation")
    total, parts = loss_fn({"logits": logits}, {"mask": per_step})
    assert set(parts) == {"focal", "dice", "total"}
    assert parts["total"] == pytest.approx(parts["focal"] + parts["dice"], rel=1e-6)
    torch.testing.assert_close(total, loss_fn({"logits": logits}, {"mask": union})[0])
    ce, _ = build_loss(LossConfig(name="ce"), "segmentation")({"logits": logits}, {"mask": union})
    torch.testing.assert_close(ce, F.cross_entropy(logits, union))


def test_dice_needs_segmentation() -> None:
    with pytest.raises(ValueError, match="needs task segmentation"):
        build_loss(LossConfig(name="ce+dice"), "classification")


def test_aux_losses_mask_missing_labels() -> None:
    torch.manual_seed(0)
    outputs = {
        "logits": torch.randn(2, 2),
        "intensity": torch.randn(2, 4, requires_grad=True),
        "activity_type": torch.randn(2, 6),
    }
    activity = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]])
    batch = {
        "label": torch.tensor([1, 0]),
        "aux_intensity": torch.tensor([-1, 2]),
        "aux_activity_type": activity,
        "aux_activity_type_valid": torch.tensor([1.0, 0.0]),
    }
    loss_fn = build_loss(LossConfig(), "classification", {"intensity": 0.5, "activity_type": 2.0})
    total, parts = loss_fn(outputs, batch)
    intensity = F.cross_entropy(outputs["intensity"][1:], torch.tensor([2]))
    activity_loss = F.binary_cross_entropy_with_logits(outputs["activity_type"][:1], activity[:1])
    ce = F.cross_entropy(outputs["logits"], batch["label"])
    assert parts["aux_intensity"] == pytest.approx(intensity.item(), rel=1e-5)
    assert parts["aux_activity_type"] == pytest.approx(activity_loss.item(), rel=1e-5)
    torch.testing.assert_close(total, ce + 0.5 * intensity + 2.0 * activity_loss)

    batch["aux_intensity"] = torch.tensor([-1, -1])  # nothing labelled: contributes 0, still differentiable
    total, parts = loss_fn(outputs, batch)
    assert parts["aux_intensity"] == 0.0
    total.backward()
    assert torch.all(outputs["intensity"].grad == 0)


def test_aux_loss_errors_name_the_missing_key() -> None:
    loss_fn = build_loss(LossConfig(), "classification", {"phase": 1.0})
    with pytest.raises(KeyError, match="model outputs has no 'phase'"):
        loss_fn({"logits": torch.randn(2, 2)}, {"label": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="unknown auxiliary head 'colour'"):
        build_loss(LossConfig(), "classification", {"colour": 1.0})


# ---------------------------------------------------------------------------------------- metrics
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
TARGETS = np.array([1, 0, 1, 1, 0, 0, 1, 0])


def _numpy_reference(preds: np.ndarray, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    tp = np.sum((preds == 1) & (targets == 1))
    fp = np.sum((preds == 1) & (targets == 0))
    fn = np.sum((preds == 0) & (targets == 1))
    order = np.argsort(-scores)
    hits = targets[order]
    precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    pos, neg = scores[targets == 1], scores[targets == 0]
    return {
        "precision": tp / (tp + fp),
        "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "ap": np.sum(precision_at_k * hits) / hits.sum(),  # exact AP without ties
        "auroc": np.mean(pos[:, None] > neg[None, :]),
    }


def test_exact_ap_and_auroc_on_a_tiny_example() -> None:
    suite = MetricSuite("classification")
    suite.update({"logits": _logits_for(SCORES)}, {"label": torch.as_tensor(TARGETS)})
    result = suite.compute()
    # ranks of positives 1, 3, 4, 7: AP = (1/1 + 2/3 + 3/4 + 4/7) / 4; AUROC = 11 ordered pairs of 16.
    assert result["ap_deformation"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 7) / 4, rel=1e-6)
    assert result["auroc_deformation"] == pytest.approx(11 / 16, rel=1e-6)


def _reference_ap5(logits: torch.Tensor, target: torch.Tensor) -> list[float]:
    """The reference's metric: AveragePrecision(multiclass, average none, thresholds=5) fed the raw logits."""
    metric = MulticlassAveragePrecision(num_classes=2, average="none", thresholds=5)
    metric.update(logits, target)
    return metric.compute().tolist()


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_ap5_equals_torchmetrics_with_5_thresholds_and_differs_from_exact_ap(task: str) -> None:
    torch.manual_seed(3)
    shape = (40,) if task == "classification" else (4, 6, 6)
    target = torch.randint(0, 2, shape)
    logits = torch.randn(shape[0], 2, *shape[1:]) + target.unsqueeze(1) * torch.tensor([0.0, 1.0]).reshape(1, 2, *[1] * (len(shape) - 1))
    batch = {"label": target} if task == "classification" else {"mask": target}
    suite = MetricSuite(task)
    for part in range(2):  # two batches accumulate
        half = slice(part * shape[0] // 2, (part + 1) * shape[0] // 2)
        suite.update({"logits": logits[half]}, {k: v[half] for k, v in batch.items()})
    values = suite.compute()
    expected = _reference_ap5(logits, target)
    assert [values["ap5_non_deformation"], values["ap5_deformation"]] == pytest.approx(expected, rel=1e-6)
    if task == "classification":
        assert values["ap_deformation"] != pytest.approx(values["ap5_deformation"], rel=1e-3)
    else:
        assert "ap_deformation" not in values  # exact pixel AP is not offered (see metrics docstring)


def test_metric_suite_classification_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.01, 0.99, 40)
    targets = (rng.uniform(size=40) < scores).astype(int)
    suite = MetricSuite("classification")
    for part in np.array_split(np.arange(40), 3):  # several batches accumulate
        suite.update({"logits": _logits_for(scores[part])}, {"label": torch.as_tensor(targets[part])})
    values = suite.compute()
    preds = (scores > 0.5).astype(int)
    reference = _numpy_reference(preds, targets, scores)
    for key in ("precision", "recall", "f1", "ap", "auroc"):
        assert values[f"{key}_deformation"] == pytest.approx(reference[key], rel=1e-5), key
    negative = _numpy_reference(1 - preds, 1 - targets, 1 - scores)
    assert values["f1_non_deformation"] == pytest.approx(negative["f1"], rel=1e-5)
    assert values["accuracy_deformation"] == pytest.approx(reference["recall"], rel=1e-5)
    assert values["accuracy"] == pytest.approx(np.mean(preds == targets), rel=1e-5)
    suite.reset()
    suite.update({"logits": _logits_for(np.array([0.9, 0.2]))}, {"label": torch.tensor([1, 0])})
    assert suite.compute()["f1_deformation"] == 1.0


def test_metric_suite_segmentation_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    target = torch.as_tensor(rng.integers(0, 2, (3, 2, 8, 8)))  # (B, T, H, W): the union is scored
    pred = torch.as_tensor(rng.integers(0, 2, (3, 8, 8)))
    suite = MetricSuite("segmentation")
    suite.update({"logits": _confident(pred)}, {"mask": target})
    values = suite.compute()
    union = target.amax(dim=1).numpy().ravel()
    reference = _numpy_reference(pred.numpy().ravel(), union, np.zeros(union.shape))
    for key in ("precision", "recall", "f1", "iou"):
        assert values[f"{key}_deformation"] == pytest.approx(reference[key], rel=1e-5), key
    assert "auroc_deformation" not in values and "iou_non_deformation" in values


def test_subgroups_report_recall_and_ap_against_all_negatives() -> None:
    # SCORES / TARGETS: positives at 0.9, 0.7, 0.6, 0.2; negatives at 0.8, 0.4, 0.3, 0.1.
    preds = SCORES > 0.5
    high = ["High", "", "High", "Low", "", "", "Low", ""]  # two groups of positives only
    frames = [["f1"], ["f1"], ["f1"], ["f1"], ["f2"], ["f2"], ["f2"], ["f2"]]
    by_intensity = subgroup_metrics([[g] if g else [] for g in high], preds, TARGETS, SCORES)
    assert set(by_intensity) == {"High", "Low"}
    # High = the positives at 0.9 and 0.7, ranked against all four negatives: hits at ranks 1 and 3.
    assert by_intensity["High"]["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert by_intensity["High"]["recall"] == 1.0
    # Low = the positives at 0.6 and 0.2: ranks 2 (behind 0.8) and 5 (behind 0.8, 0.4, 0.3).
    assert by_intensity["Low"]["ap"] == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert by_intensity["Low"]["recall"] == 0.5
    assert math.isnan(by_intensity["High"]["false_alarms"])
    by_frame = subgroup_metrics(frames, preds, TARGETS, SCORES)
    assert by_frame["f2"]["n"] == 4 and by_frame["f2"]["n_deformation"] == 1
    assert by_frame["f1"]["false_alarms"] == 1.0 and by_frame["f2"]["false_alarms"] == 0.0
    # A sample may belong to several groups (a frame that covers two volcanoes).
    both = subgroup_metrics([["a", "b"]] * 8, preds, TARGETS, SCORES)
    assert both["a"] == both["b"] and both["a"]["n"] == 8
    with pytest.raises(ValueError, match="equally long"):
        subgroup_metrics([["a"]], preds, TARGETS, SCORES)


def _ddp_worker(rank: int, world: int, port: int, scores: np.ndarray, targets: np.ndarray, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        # uneven shards (rank 0 holds one more sample), and everything on rank 0 (rank 1 saw nothing)
        shards = {"strided": slice(rank, None, world), "rank0": slice(None) if rank == 0 else slice(0)}
        for mode, shard in shards.items():
            suite = MetricSuite("classification")
            if len(targets[shard]):
                batch = {"label": torch.as_tensor(targets[shard])}
                suite.update({"logits": _logits_for(scores[shard])}, batch)
            results[mode] = suite.compute()
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_roc_and_pr_curves_match_a_hand_computed_example() -> None:
    found = curves(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.4, 0.1]))
    assert found.tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]  # thresholds 1, 0.9, 0.8, 0.4, 0.1
    assert found.fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    np.testing.assert_allclose(found.precision, [0.5, 2 / 3, 0.5, 1.0, 1.0])  # thresholds 0.1 ... 0.9, then none
    assert found.recall.tolist() == [1.0, 1.0, 0.5, 0.5, 0.0]
    tied = curves(np.array([1, 0, 1, 1, 0]), np.array([0.9, 0.9, 0.4, 0.4, 0.1]))
    assert tied.tpr.tolist() == pytest.approx([0.0, 1 / 3, 1.0, 1.0])  # one point per distinct threshold
    assert curves(np.array([1, 1]), np.array([0.2, 0.3])) is None  # one class: undefined


def test_metric_suite_syncs_under_ddp_gloo(tmp_path) -> None:
    rng = np.random.default_rng(2)
    scores = rng.uniform(0.01, 0.99, 21)
    targets = (rng.uniform(size=21) < scores).astype(int)
    mp.spawn(_ddp_worker, args=(2, free_port(), scores, targets, str(tmp_path)), nprocs=2, join=True)
    single = MetricSuite("classification")
    single.update({"logits": _logits_for(scores)}, {"label": torch.as_tensor(targets)})
    expected = single.compute()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["strided"] == pytest.approx(expected, rel=1e-5)
        assert got["rank0"] == pytest.approx(expected, rel=1e-5)
