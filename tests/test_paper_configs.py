"""configs/paper/: the reference recipe, value by value, and one real training step of each preset on CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from thalia_ray.config import load_config
from thalia_ray.data import schema
from thalia_ray.data.cube import crop_rng, get_cache, read_sample
from thalia_ray.data.index import SampleIndex, sample_rng
from thalia_ray.data.locations import DataLocations
from thalia_ray.storage import S3Options
from thalia_ray.data.pipeline import TorchCollate
from thalia_ray.data.transforms import finalize, statistics_for
from thalia_ray.losses import build_loss
from thalia_ray.models.pretrained import check_imagenet_available, weights_repo
from thalia_ray.models.registry import check_model_name
from thalia_ray.train.evaluate import model_from_config
from thalia_ray.train.step import build_optimizer, clear_gradients, optimizer_step

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
PRESETS = sorted(PAPER.glob("*.yaml"))


def test_the_presets_exist() -> None:
    assert [p.stem for p in PRESETS] == ["cls-series-vit", "cls-series", "cls-single", "seg-series", "seg-single"]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_the_reference_recipe(path: Path) -> None:
    cfg = load_config(path)
    task = "classification" if path.stem.startswith("cls") else "segmentation"
    data, train = cfg.data, cfg.train
    assert (cfg.seed, cfg.model.task, data.length) == (333, task, 1 if path.stem.endswith("single") else 3)
    assert data.channels == list(schema.ALL_CHANNELS)  # the reference config's 3 + 2 × 3 channels
    assert (data.crop, data.mask_target, data.label_rule, data.label_rule_for("test")) == (512, "union", "union", "union")
    assert (data.augmentations, data.balance, data.normalize, data.policy) == (False, True, True, "enumerate")
    assert (data.padding, data.epoch_plan) == ("reference", "random_mix")  # its padding draws, its RandomMix epochs
    assert data.on_bad_sample == "fail"  # the reference stops at a bad sample: evaluation never drops one
    assert data.crop_policy == "reference"  # cube-mask box ±crop/4, one fixed crop per sample
    assert (train.lr, train.weight_decay, train.batch_size, train.epochs) == (1e-5, 1e-4, 2, 90)
    assert (train.scheduler, train.warmup_fraction, train.grad_clip, train.precision) == ("constant", 0.0, None, "fp32")
    vit = "vit" in cfg.model.name  # the reference's ViT schedule: timm's warm-up from 1e-6 over 5 × 2725 steps
    warmup = (5, 1e-6, 2725) if vit else (None, None, None)
    assert (train.warmup_epochs, train.warmup_start_lr, train.schedule_epoch_steps) == warmup
    assert train.grad_reset == "epoch"  # the reference clears gradients once per epoch
    assert (train.loss.name, train.loss.focal_gamma, train.loss.focal_alpha) == ("focal", 2.0, [0.25, 0.75])
    assert train.loss.focal_form == "reference"  # the reference's gradients: (1 - p_t)^γ detached
    assert not train.loss.confidence_weighting and train.loss.class_weights is None
    stopping = train.early_stopping
    assert (stopping.metric, stopping.mode, stopping.patience, train.test_best) == ("val/loss", "min", None, True)
    assert (train.num_workers, train.max_steps_per_epoch, cfg.model.pretrained) == (1, None, "imagenet")
    spec = check_model_name(task, cfg.model.name)
    check_imagenet_available(spec, cfg.model.encoder)  # weights exist upstream for the preset's network
    assert weights_repo(spec, cfg.model.encoder).startswith(("timm/", "smp-hub/"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_runs_one_training_step_on_cpu(path: Path, synthetic_root: Path) -> None:
    # A small crop for the CPU; ImageNet initialisation is covered offline in test_pretrained.
    cfg = load_config(path, [f"data.root={synthetic_root}", "data.crop=32", "model.pretrained=none"])
    index = SampleIndex.from_config(cfg.data, cfg.seed)
    epoch = index.epoch("train", 0)
    batch_samples = [next(s for s in epoch if s.label == 1), next(s for s in epoch if s.label == 0)]
    assert len(batch_samples) == cfg.train.batch_size
    cache = get_cache(cfg.data.root)
    raws = [read_sample(s, index.annotations, cache, cfg.data, crop_rng(cfg.data.crop_policy, cfg.seed, s.key, 0))
            for s in batch_samples]  # as the pipeline reads epoch 0
    assert raws[0].mask.any()  # the positive's reference crop holds some of its cube mask
    stats = statistics_for(DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics)
    records = [finalize(raw, cfg.data, stats, sample_rng(cfg.seed, 0, s.key), training=True)
               for raw, s in zip(raws, batch_samples)]
    batch = TorchCollate()({k: np.stack([r[k] for r in records]) for k in records[0]})
    assert batch["image"].shape == (2, cfg.data.length * len(schema.ALL_CHANNELS), 32, 32)

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg).train()
    optimizer = build_optimizer(model, cfg.train)
    loss_fn = build_loss(cfg.train.loss, cfg.model.task, cfg.model.aux_heads)
    before = [p.detach().clone() for p in model.parameters()]
    loss, parts = loss_fn(model(batch["image"]), batch)
    clear_gradients(optimizer)  # as the loop does at the start of an epoch
    optimizer_step(loss, model, optimizer, torch.amp.GradScaler("cuda", enabled=False), cfg.train)
    assert torch.isfinite(loss) and set(parts) == {"focal", "total"}
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.slow
def test_a_paper_preset_fails_on_a_damaged_test_sample_and_skip_says_what_its_metrics_miss(ray_cluster, tmp_path):
    """A preset run (scaled down for a CPU) whose test cube lost a sample's chunks stops at the test
    evaluation naming that sample; with `data.on_bad_sample: skip` it finishes, and its summary line,
    results.json, leaderboard and report all say the test metrics cover n_evaluated < n_expected samples."""
    import re

    from thalia_ray.errors import ThaliaError
    from thalia_ray.report.page import write_report
    from thalia_ray.store.layout import ExperimentStore
    from thalia_ray.leaderboard import leaderboard_text
    from thalia_ray.train.trainer import fit

    from tests.helpers import build_root, delete_pair_chunks

    root = build_root(tmp_path / "root")
    overrides = [f"data.root={root}", "data.crop=32", "data.samples_per_read_task=32", "model.pretrained=none",
                 "train.epochs=1", "train.device=auto", "train.cpus_per_worker=1", "train.max_failures=0",
                 f"storage.store={tmp_path / 'store'}", "runtime.wandb.mode=disabled"]
    cfg = load_config(PAPER / "cls-single.yaml", overrides)
    test_samples = SampleIndex.from_config(cfg.data, cfg.seed).samples("test")
    victim = test_samples[0]
    delete_pair_chunks(root, victim)
    store = ExperimentStore.of(cfg.storage)

    with pytest.raises(ThaliaError, match=rf"data.on_bad_sample=fail\) in test .*key {re.escape(victim.key)}"):
        fit(cfg, store=store, run_id="preset-fail")
    assert store.run("preset-fail").read_status()["status"] == "failed"
    assert store.run("preset-fail").read_results() is None  # no metrics over fewer samples were recorded

    result = fit(cfg.with_overrides({"data.on_bad_sample": "skip"}), store=store, run_id="preset-skip")
    n = len(test_samples)
    assert f"test metrics over {n - 1} of {n} samples" in str(result) and "val metrics over" not in str(result)
    metrics = store.run("preset-skip").read_results()["metrics"]
    assert (metrics["test/n_evaluated"], metrics["test/n_expected"]) == (n - 1, n)
    assert metrics["val/n_evaluated"] == metrics["val/n_expected"] > 0
    board = leaderboard_text(store).splitlines()
    assert board[1].split()[-1] == "evaluated" and board[3].split()[-1] == f"{n - 1}/{n}"
    page = write_report(store, "preset-skip").read_text()
    assert f"test samples evaluated</td><td class=\"text\">{n - 1} of {n}" in page and "fewer samples" in page
