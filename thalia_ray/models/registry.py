"""Model registry: names → builders, resolved lazily so that validating a config imports no torch.

Part of the bottom layer (docs/architecture.md): it imports nothing of the package but `errors`, so that
`config` can check model names; the builders are named by string and imported only by `resolve()`.

Each entry names the tasks it serves, its family (for leaderboards) and the `module:function` that
builds it. Builders take `(spec, cfg, in_channels, num_classes, time_steps, channels_per_step)`
and return an `nn.Module`; see `thalia_ray.models.factory.build_model`.

Beyond the short names below, classification takes any timm model by its timm name (as the
reference's `architecture` does), and segmenters take any smp encoder (`model.encoder`, including
`tu-<timm name>`); both are checked against the installed libraries, which are imported only then.

DeepLab: the Thalia reference's `architecture: "deeplabv3"` builds `smp.DeepLabV3Plus`. So that no
one gets the other network by accident, the bare name `deeplabv3` is refused; `deeplabv3plus` is
smp's DeepLabV3Plus (the reference's "deeplabv3") and `deeplabv3_plain` smp's DeepLabV3.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from thalia_ray.errors import ConfigError


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
        ModelSpec("deeplabv3_plain", _SEG, "deeplabv3", _SMP, "DeepLabV3"),
        ModelSpec("segformer", _SEG, "segformer", _SMP, "Segformer"),
        # time kept as its own axis: (T, C, H, W)
        ModelSpec("spatiotemporal", _BOTH, "spatiotemporal", _ST, "factorised-3d"),
    ]
}
AMBIGUOUS = {
    "deeplabv3": "ambiguous: the Thalia reference's 'deeplabv3' is smp.DeepLabV3Plus, use 'deeplabv3plus'; "
    "for smp.DeepLabV3 use 'deeplabv3_plain'",
}
# timm modules whose models take `dynamic_img_size` (any crop, position embeddings interpolated).
_VIT_MODULES = ("vision_transformer", "deit")


def available(task: str | None = None) -> list[str]:
    return [n for n, s in REGISTRY.items() if task is None or task in s.tasks]


def get_spec(name: str) -> ModelSpec:
    """A registry entry, or a timm classifier by its timm name."""
    spec = REGISTRY.get(name) or _timm_spec(name)
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available())} or any timm model name")
    return spec


def check_model_name(task: str, name: str) -> ModelSpec:
    """Validate a (task, name) pair; the message lists the models that serve the task."""
    if name in AMBIGUOUS:
        raise ConfigError(f"model {name!r} is {AMBIGUOUS[name]}")
    spec = REGISTRY.get(name) or (_timm_spec(name) if task == "classification" else None)
    if spec is None or task not in spec.tasks:
        extra = " or any timm model name (`thalia-ray models --all`)" if task == "classification" else ""
        raise ConfigError(
            f"model {name!r} is not available for {task}; choose one of: {', '.join(available(task))}{extra}"
        )
    return spec


def check_encoder(encoder: str) -> str:
    """An smp encoder name, or `tu-<timm model>`, checked against the installed libraries."""
    if encoder.startswith("tu-"):
        import timm

        if timm.is_model(encoder[3:]):
            return encoder
        raise ConfigError(f"{encoder!r}: timm has no model {encoder[3:]!r} (`thalia-ray models --all`)")
    if encoder in smp_encoders():
        return encoder
    raise ConfigError(
        f"{encoder!r} is not an smp encoder; e.g. resnet18, resnet50, resnext50_32x4d, mit_b2, "
        "or tu-<timm model> (`thalia-ray models --all` lists them)"
    )


def smp_encoders() -> list[str]:
    from segmentation_models_pytorch.encoders import get_encoder_names

    return get_encoder_names()


def timm_classifiers() -> list[str]:
    import timm

    return timm.list_models()


def _timm_spec(name: str) -> ModelSpec | None:
    import timm

    if not timm.is_model(name):
        return None
    module = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    family = "vit" if module in _VIT_MODULES else module
    return ModelSpec(name, _CLS, family, _TIMM, name)
