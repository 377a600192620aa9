"""Model zoo: every family builds, runs forward and backward with T·C channels, and honours the contract."""
from __future__ import annotations

import subprocess
import sys

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from thalia_ray.config import ModelConfig, load_config
from thalia_ray.models.factory import adapt_input_conv, build_model, load_pretrained
from thalia_ray.models.heads import AUX_HEADS
from thalia_ray.models.pretrained import PretrainedWeightsError

C = 3  # channels per time step
CROP = 32
FAMILIES = [
    ("classification", "resnet18"),
    ("classification", "mobilenetv3_small"),
    ("classification", "efficientnetv2_tiny"),
    ("classification", "convnext_atto"),
    ("classification", "vit_tiny"),
    ("classification", "spatiotemporal"),
    ("segmentation", "unet"),
    ("segmentation", "deeplabv3plus"),
    ("segmentation", "deeplabv3_plain"),
    ("segmentation", "segformer"),
    ("segmentation", "spatiotemporal"),
]
ALL_AUX = {"activity_type": 1.0, "intensity": 0.5, "phase": 0.5, "fringes": 0.2}


def _build(task: str, name: str, time_steps: int, **kwargs) -> torch.nn.Module:
    return build_model(ModelConfig(task=task, name=name, **kwargs), C * time_steps, time_steps)


@pytest.mark.parametrize("time_steps", [1, 3])
@pytest.mark.parametrize("task,name", FAMILIES)
def test_forward_backward_with_aux_heads(task: str, name: str, time_steps: int) -> None:
    torch.manual_seed(0)
    model = _build(task, name, time_steps, aux_heads=ALL_AUX)
    x = torch.randn(2, C * time_steps, CROP, CROP)
    out = model(x)
    expected = (2, 2) if task == "classification" else (2, 2, CROP, CROP)
    assert out["logits"].shape == expected
    assert set(out) == {"logits", *ALL_AUX}
    for head, (size, _) in AUX_HEADS.items():
        assert out[head].shape == (2, size)
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv_grad = next(p.grad for p in model.parameters() if p.ndim >= 4)
    assert first_conv_grad.abs().sum() > 0  # the input layer learns from both time steps and aux heads


def test_without_aux_heads_only_logits() -> None:
    out = _build("classification", "resnet18", 1)(torch.randn(2, C, CROP, CROP))
    assert list(out) == ["logits"]


def test_vit_takes_crops_that_are_not_a_multiple_of_the_patch() -> None:
    model = _build("classification", "vit_tiny", 3).eval()
    assert model(torch.randn(1, 9, 40, 40))["logits"].shape == (1, 2)


@pytest.mark.parametrize("name,crop,divisor", [("deeplabv3plus", 40, 16), ("segformer", 48, 32)])
def test_incompatible_crop_is_named(name: str, crop: int, divisor: int) -> None:
    model = _build("segmentation", name, 1)
    assert model.input_divisor == divisor
    with pytest.raises(ValueError, match=rf"{crop}x{crop}.*data\.crop as a multiple of {divisor}"):
        model(torch.randn(1, C, crop, crop))


def test_unet_and_spatiotemporal_take_any_crop() -> None:
    for name in ("unet", "spatiotemporal"):
        model = _build("segmentation", name, 2).eval()
        assert model(torch.randn(1, 2 * C, 36, 44))["logits"].shape == (1, 2, 36, 44)


def test_tiny_segmenter_encoder_from_config() -> None:
    model = _build("segmentation", "segformer", 3, encoder="mit_b0")
    assert model(torch.randn(2, 9, CROP, CROP))["logits"].shape == (2, 2, CROP, CROP)


def test_bad_inputs_are_rejected_clearly() -> None:
    model = _build("classification", "resnet18", 3)
    with pytest.raises(ValueError, match=r"expects input \(B, 9, H, W\)"):
        model(torch.randn(2, 3, CROP, CROP))
    with pytest.raises(ValueError, match="multiple of time_steps"):
        build_model(ModelConfig(name="resnet18"), 8, 3)
    with pytest.raises(ValueError, match="not available for classification"):
        build_model(ModelConfig.model_construct(task="classification", name="unet"), 3, 1)
    with pytest.raises(ValueError, match="'nope' is not an smp encoder"):
        _build("segmentation", "unet", 1, encoder="nope")


def test_spatiotemporal_keeps_time_as_an_axis() -> None:
    torch.manual_seed(0)
    three = _build("classification", "spatiotemporal", 3).eval()
    five = _build("classification", "spatiotemporal", 5)
    # The encoder sees C channels per step, so its size does not depend on T ...
    assert three.encoder.stages[0].spatial[0].in_channels == C
    assert sum(p.numel() for p in three.parameters()) == sum(p.numel() for p in five.parameters())
    # ... and the order of the steps matters (temporal convolutions), unlike a set of channels.
    x = torch.randn(2, 3, C, CROP, CROP)
    forward = three(x.flatten(1, 2))["logits"]
    backward = three(x.flip(1).flatten(1, 2))["logits"]
    assert not torch.allclose(forward, backward)


def test_adapt_input_conv_preserves_activations_for_repeated_channels() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    image = torch.randn(1, 3, 8, 8)
    adapted = adapt_input_conv(weight, 9)
    assert adapted.shape == (4, 9, 3, 3)
    same = torch.nn.functional.conv2d(image.repeat(1, 3, 1, 1), adapted)
    torch.testing.assert_close(same, torch.nn.functional.conv2d(image, weight))


def test_pretrained_timm_weights_with_other_channels_and_classes(tmp_path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet18", pretrained=False, in_chans=3, num_classes=5)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="resnet18", pretrained=str(path)), 9, 3)
    backbone = model.backbone
    torch.testing.assert_close(backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    torch.testing.assert_close(backbone.conv1.weight, adapt_input_conv(source.conv1.weight, 9))
    report = load_pretrained(_build("classification", "resnet18", 3), path)
    assert report.adapted == ["conv1.weight"]
    assert report.skipped == ["fc.bias", "fc.weight"]
    assert not report.missing and not report.unexpected
    assert "2 skipped (shape differs): fc.bias, fc.weight" in report.summary()


def test_pretrained_round_trip_of_our_own_model(tmp_path) -> None:
    torch.manual_seed(0)
    trained = _build("segmentation", "spatiotemporal", 2, aux_heads={"phase": 1.0}).eval()
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    loaded = _build("segmentation", "spatiotemporal", 2, aux_heads={"phase": 1.0}, pretrained=str(path)).eval()
    x = torch.randn(1, 2 * C, CROP, CROP)
    for key, value in trained(x).items():
        torch.testing.assert_close(loaded(x)[key], value)


def test_pretrained_errors(tmp_path) -> None:
    with pytest.raises(PretrainedWeightsError, match="not a local file"):
        _build("classification", "resnet18", 1, pretrained="weights.pt")
    not_a_state = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_state)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        _build("classification", "resnet18", 1, pretrained=str(not_a_state))
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"foo.weight": torch.zeros(2)}, unrelated)
    with pytest.raises(ValueError, match="no tensor matches"):
        _build("classification", "resnet18", 1, pretrained=str(unrelated))


# ------------------------------------------------------------------------- names, freezing, DeepLab
def test_any_timm_classifier_and_smp_encoder_by_name() -> None:
    model = _build("classification", "resnet10t", 3)  # a timm name outside the short list
    assert model.backbone.default_cfg["architecture"] == "resnet10t" and model.in_channels == 9
    assert model(torch.randn(2, 9, CROP, CROP))["logits"].shape == (2, 2)
    tu = _build("segmentation", "unet", 1, encoder="tu-resnet10t")
    assert tu.eval()(torch.randn(1, C, CROP, CROP))["logits"].shape == (1, 2, CROP, CROP)
    with pytest.raises(ValueError, match="not available for classification.*any timm model name"):
        ModelConfig(name="no_such_net")
    with pytest.raises(ValueError, match="model.encoder.*not an smp encoder"):
        load_config(overrides=["model.task=segmentation", "model.encoder=no_such_encoder"])


def test_deeplab_names_say_which_network() -> None:
    with pytest.raises(ValueError, match="reference's 'deeplabv3' is smp.DeepLabV3Plus, use 'deeplabv3plus'"):
        ModelConfig(task="segmentation", name="deeplabv3")
    plus = _build("segmentation", "deeplabv3plus", 1).net
    plain = _build("segmentation", "deeplabv3_plain", 1).net
    assert type(plus) is smp.DeepLabV3Plus and type(plain) is smp.DeepLabV3


@pytest.mark.parametrize("task,name", [("classification", "resnet18"), ("segmentation", "unet"),
                                       ("classification", "spatiotemporal")])
def test_freeze_encoder_freezes_the_first_layers_and_training_leaves_them(task: str, name: str) -> None:
    torch.manual_seed(0)
    model = _build(task, name, 1, freeze_encoder=0.5)
    layers = model.encoder_layers()
    frozen, trained = layers[: len(layers) // 2], layers[len(layers) // 2:]
    assert frozen and all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trained for p in m.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, C, CROP, CROP))["logits"].float().pow(2).mean().backward()
    optimizer.step()
    frozen_params = {id(p) for m in frozen for p in m.parameters()}
    changed = {id(p) for key, p in model.named_parameters() if not torch.equal(p, before[key])}
    assert not changed & frozen_params and changed  # frozen layers stay, the rest learns
    everything = _build(task, name, 1, freeze_encoder=1.0)
    assert all(not p.requires_grad for m in everything.encoder_layers() for p in m.parameters())


def test_models_all_lists_installed_timm_models_and_smp_encoders() -> None:
    out = subprocess.run([sys.executable, "-m", "thalia_ray.cli", "models", "--all"], capture_output=True,
                         text=True, check=True).stdout
    names = set(out.split())
    assert {"resnet18", "deeplabv3plus", "deeplabv3_plain"} <= names
    assert {"resnet10t", "convnext_small", "vit_base_patch16_224"} <= names  # timm
    assert {"resnext50_32x4d", "mit_b2"} <= names  # smp encoders
