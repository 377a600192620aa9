"""Initial weights: ImageNet through timm's and smp's own loaders from a hub cache the test fills itself
(offline, as on a cluster without network), the error that names the cache, and run:<RUN_ID>."""
from __future__ import annotations

from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from timm.models import adapt_input_conv

from thalia_ray.config import ModelConfig, load_config
from thalia_ray.models.factory import build_model
from thalia_ray.models.pretrained import PretrainedWeightsError, fetch_command, weights_repo
from thalia_ray.models.registry import check_model_name
from thalia_ray.store import ExperimentStore
from thalia_ray.train.checkpoint import save_state
from thalia_ray.train.evaluate import model_from_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline, set as a user sets it: HF_HUB_CACHE, HF_HUB_OFFLINE=1.

    huggingface_hub reads those variables when it is imported, which happened before this test, so its
    `constants` are pointed at the same values.
    """
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def fill_cache(cache: Path, repo: str, files: dict[str, bytes | dict[str, torch.Tensor]], revision: str | None) -> None:
    """A hub repository snapshot in huggingface_hub's cache layout (refs/main when no revision is pinned)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / (revision or COMMIT)
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, dict):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / name))
        else:
            (snapshot / name).write_bytes(content)
    if revision is None:
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(COMMIT)


def test_timm_imagenet_weights_load_from_the_filled_cache_with_the_stem_adapted(offline_hub: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as empty:
        build_model(ModelConfig(name="resnet18", pretrained="imagenet"), 9, 3)
    message = str(empty.value)
    assert str(offline_hub) in message and "timm/resnet18.a1_in1k" in message
    assert "hf download timm/resnet18.a1_in1k" in message and "HF_HUB_OFFLINE=1" in message

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)  # stands in for the published ImageNet weights
    fill_cache(offline_hub, "timm/resnet18.a1_in1k", {"model.safetensors": source.state_dict()}, None)
    model = build_model(ModelConfig(name="resnet18", pretrained="imagenet"), 9, 3)
    backbone = model.backbone
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(backbone.conv1.weight, adapt_input_conv(9, source.conv1.weight))
    assert backbone.fc.weight.shape == (2, 512)  # a fresh two-class head


def test_smp_encoder_imagenet_weights_load_from_the_filled_cache(offline_hub: Path) -> None:
    settings = smp_encoders["resnet18"]["pretrained_settings"]["imagenet"]
    with pytest.raises(PretrainedWeightsError, match=rf"{settings['repo_id']}@{settings['revision']}.*{offline_hub}"):
        build_model(ModelConfig(task="segmentation", name="unet", pretrained="imagenet"), 9, 3)

    torch.manual_seed(2)
    source = smp.encoders.get_encoder("resnet18", weights=None)
    fill_cache(offline_hub, settings["repo_id"], {"config.json": b"{}", "model.safetensors": source.state_dict()},
               settings["revision"])
    model = build_model(ModelConfig(task="segmentation", name="deeplabv3plus", pretrained="imagenet"), 9, 3)
    encoder = model.net.encoder
    torch.testing.assert_close(encoder.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(encoder.conv1.weight, adapt_input_conv(9, source.conv1.weight))


def test_weights_without_a_hub_copy_are_fetched_into_the_torch_hub_cache(offline_hub: Path) -> None:
    spec = check_model_name("classification", "gcvit_base")  # timm loads its weights from a plain URL
    url = weights_repo(spec, "")
    assert url.startswith("https://") and url.endswith(".pth")
    target = offline_hub.parent / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]  # TORCH_HOME/hub
    assert fetch_command(url) == f"curl -L --create-dirs -o {target} {url}"
    assert fetch_command("smp-hub/resnet18.imagenet@abc") == "hf download smp-hub/resnet18.imagenet --revision abc"


def test_imagenet_is_refused_where_no_weights_exist() -> None:
    with pytest.raises(PretrainedWeightsError, match="no pretrained weights for 'efficientnetv2_s'"):
        build_model(ModelConfig(name="efficientnetv2_s", pretrained="imagenet"), 3, 1)
    with pytest.raises(PretrainedWeightsError, match="our own network"):
        build_model(ModelConfig(name="spatiotemporal", pretrained="imagenet"), 3, 1)
    assert ModelConfig(pretrained="none").pretrained is None


def test_run_reference_starts_from_that_runs_best_checkpoint(tmp_path: Path) -> None:
    store_root = tmp_path / "store"
    source_cfg = load_config(overrides=[f"storage.store={store_root}", "data.length=1"])
    torch.manual_seed(3)
    trained = model_from_config(source_cfg)
    checkpoint = store_root / "ray" / "r1" / "checkpoint_000002"
    checkpoint.mkdir(parents=True)
    save_state({"model": trained.state_dict()}, checkpoint)
    record = ExperimentStore(store_root).run("r1")
    record.write_config(source_cfg)
    record.write_results({"val/loss": 0.1}, best_epoch=2, best_checkpoint=str(checkpoint))

    # Fine-tuning it on series of 3: the first convolution is adapted, everything else is the run's.
    tuned = model_from_config(source_cfg.with_overrides({"model.pretrained": "run:r1", "data.length": 3}))
    torch.testing.assert_close(tuned.backbone.layer2[0].conv1.weight, trained.backbone.layer2[0].conv1.weight)
    torch.testing.assert_close(tuned.backbone.fc.weight, trained.backbone.fc.weight)
    torch.testing.assert_close(tuned.backbone.conv1.weight, adapt_input_conv(9, trained.backbone.conv1.weight))
    with pytest.raises(PretrainedWeightsError, match="run:nope.*no run 'nope'"):
        model_from_config(source_cfg.with_overrides({"model.pretrained": "run:nope"}))


@pytest.mark.slow
def test_a_ray_train_run_fine_tunes_from_a_stored_run(ray_cluster, synthetic_root: Path, tmp_path: Path) -> None:
    """run:<ID> end to end: the driver checks it, every worker starts from that run's best checkpoint."""
    from thalia_ray.train.checkpoint import load_state
    from thalia_ray.train.evaluate import best_checkpoint
    from thalia_ray.train.trainer import fit

    store = ExperimentStore(tmp_path / "store")
    cfg = load_config(overrides=[
        f"data.root={synthetic_root}", "data.crop=32", f"storage.store={store.root.path}", "runtime.wandb.mode=disabled",
        "train.epochs=1", "train.max_steps_per_epoch=1", "train.num_workers=1", "train.batch_size=4",
        "train.cpus_per_worker=0.5", "train.max_failures=0", "train.test_best=false", "train.grad_clip=null",
        "train.scheduler=constant", "train.warmup_fraction=0", "train.weight_decay=0", "model.name=resnet18",
    ])
    first = fit(cfg, store=store)
    # One step at a vanishing learning rate: the fine-tuned weights are the first run's, to rounding.
    tuned = fit(cfg.with_overrides({"model.pretrained": f"run:{first.run_id}", "train.lr": 1e-12}), store=store)
    before = load_state(best_checkpoint(store, first.run_id))["model"]
    after = load_state(best_checkpoint(store, tuned.run_id))["model"]
    weights = [k for k in before if k.endswith("conv1.weight") or k.endswith("fc.weight")]
    assert weights and all(torch.allclose(after[k], before[k], atol=1e-6) for k in weights)
    fresh = model_from_config(cfg).state_dict()
    assert not torch.allclose(fresh["backbone.layer1.0.conv1.weight"], after["backbone.layer1.0.conv1.weight"])
