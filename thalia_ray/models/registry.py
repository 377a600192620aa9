"""Model registry: names → builders, resolved lazily so that validating a config imports no torch.

Each entry names the tasks it serves, its family (for leaderboards) and the `module:function` that
builds it. Builders take `(spec, cfg, in_channels, num_classes, time_steps, channels_per_step)`
and return an `nn.Module`; see `thalia_ray.models.factory.build_model`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from thalia_ray.config import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    tasks: tuple[str, ...]
    family: str
    builder: str  # "module:function"
    arch: str  # the timm model name or the smp architecture

    def resolve(self) -> Callable:
        module, _, func = self.builder.partition(":")
        return getattr(import_module(module), func)


_CLS = ("classification",)
_SEG = ("segmentation",)
_BOTH = ("classification", "segmentation")
_TIMM = "thalia_ray.models.classifiers:build_timm_classifier"
_SMP = "thalia_ray.models.segmenters:build_smp_segmenter"
_ST = "thalia_ray.models.spatiotemporal:build_spatiotemporal"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        # timm classifiers (time stacked into channels)
        ModelSpec("resnet18", _CLS, "resnet", _TIMM, "resnet18"),
        ModelSpec("resnet50", _CLS, "resnet", _TIMM, "resnet50"),
        ModelSpec("mobilenetv3_small", _CLS, "mobilenetv3", _TIMM, "mobilenetv3_small_100"),
        ModelSpec("mobilenetv3_large", _CLS, "mobilenetv3", _TIMM, "mobilenetv3_large_100"),
        ModelSpec("efficientnetv2_s", _CLS, "efficientnetv2", _TIMM, "efficientnetv2_s"),
        ModelSpec("efficientnetv2_tiny", _CLS, "efficientnetv2", _TIMM, "efficientnetv2_rw_t"),
        ModelSpec("convnext_atto", _CLS, "convnext", _TIMM, "convnext_atto"),
        ModelSpec("convnext_tiny", _CLS, "convnext", _TIMM, "convnext_tiny"),
        ModelSpec("vit_tiny", _CLS, "vit", _TIMM, "vit_tiny_patch16_224"),
        ModelSpec("vit_small", _CLS, "vit", _TIMM, "vit_small_patch16_224"),
        # smp segmenters (encoder chosen by model.encoder)
        ModelSpec("unet", _SEG, "unet", _SMP, "Unet"),
        ModelSpec("deeplabv3plus", _SEG, "deeplabv3plus", _SMP, "DeepLabV3Plus"),
        ModelSpec("deeplabv3", _SEG, "deeplabv3", _SMP, "DeepLabV3"),
        ModelSpec("segformer", _SEG, "segformer", _SMP, "Segformer"),
        # time kept as its own axis: (T, C, H, W)
        ModelSpec("spatiotemporal", _BOTH, "spatiotemporal", _ST, "factorised-3d"),
    ]
}


def available(task: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if task is None or task in s.tasks]


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available())}") from None


def check_model_name(task: str, name: str) -> ModelSpec:
    """Validate a (task, name) pair; the message lists the models that serve the task."""
    spec = REGISTRY.get(name)
    if spec is None or task not in spec.tasks:
        raise ConfigError(
            f"model {name!r} is not available for {task}; choose one of: {', '.join(available(task))}"
        )
    return spec
