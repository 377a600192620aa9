"""ImageNet initialisation through timm's and smp's own loaders and caches.

`model.pretrained: imagenet` asks timm (`create_model(pretrained=True, in_chans=T·C)`) or smp
(`encoder_weights="imagenet"`) for their weights: both fetch them from the Hugging Face hub into its
cache (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`; timm models without a hub copy use the
torch hub cache, `TORCH_HOME`) and adapt the 3-channel stem to T·C inputs themselves (filters
repeated over the new channels and scaled by 3 / (T·C)). With `HF_HUB_OFFLINE=1` nothing is
downloaded and a pre-filled cache is used. When the weights are neither cached nor downloadable,
`imagenet_weights` raises one error that names the caches and how to fill them.
"""
from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Iterator

from thalia_ray.errors import ThaliaError
from thalia_ray.models.registry import ModelSpec

IMAGENET = "imagenet"


class PretrainedWeightsError(ThaliaError, RuntimeError):
    """The requested initial weights cannot be had; the message says where they were looked for."""

    exit_code = 2


def weights_file(pretrained: str) -> Path:
    """The local state-dict file `model.pretrained` names (when it is neither imagenet nor a run); one
    check, shared by the model factory and the CLI's preflight, so a typo is reported before Ray starts."""
    file = Path(pretrained)
    if not file.is_file():
        raise PretrainedWeightsError(
            f"model.pretrained {pretrained!r} is not a local file (nor imagenet, none or run:<RUN_ID>)"
        )
    return file


def hub_caches() -> str:
    """Where timm and smp look for downloaded weights, as a user would set them."""
    import torch.hub
    from huggingface_hub import constants

    return (f"Hugging Face cache {constants.HF_HUB_CACHE} (HF_HUB_CACHE / HF_HOME), "
            f"torch hub cache {torch.hub.get_dir()}/checkpoints (TORCH_HOME)")


def _timm_name(spec: ModelSpec, encoder: str) -> str | None:
    """The timm model whose weights are loaded: the classifier itself or a `tu-` encoder; None for smp's own."""
    if spec.builder.endswith("build_timm_classifier"):
        return spec.arch
    return encoder[3:] if encoder.startswith("tu-") else None


def weights_repo(spec: ModelSpec, encoder: str) -> str:
    """The hub repository (`repo[@revision]`) that holds the ImageNet weights timm or smp would load."""
    import timm

    timm_name = _timm_name(spec, encoder)
    if timm_name is not None:
        cfg = timm.models.get_pretrained_cfg(timm_name)
        return (cfg.hf_hub_id or cfg.url or "?") if cfg is not None else "?"
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder]["pretrained_settings"].get(IMAGENET)
    return f"{settings['repo_id']}@{settings['revision']}" if settings else "?"


def check_imagenet_available(spec: ModelSpec, encoder: str) -> None:
    """Refuse `imagenet` for networks that have no ImageNet weights, naming what to use instead."""
    if spec.builder.endswith("build_spatiotemporal"):
        raise PretrainedWeightsError(
            f"model.pretrained 'imagenet': {spec.name!r} is our own network and has no ImageNet weights; "
            "use none, a weights file or run:<RUN_ID>"
        )
    import timm

    timm_name = _timm_name(spec, encoder)
    if timm_name is not None and not timm.models.is_model_pretrained(timm_name):
        raise PretrainedWeightsError(
            f"model.pretrained 'imagenet': timm has no pretrained weights for {timm_name!r} (the reference trains "
            "EfficientNet v2 from scratch: model.pretrained none); or pick a pretrained variant, e.g. tf_efficientnetv2_s"
        )
    if timm_name is None:
        from segmentation_models_pytorch.encoders import encoders

        if IMAGENET not in encoders[encoder]["pretrained_settings"]:
            have = ", ".join(encoders[encoder]["pretrained_settings"]) or "none"
            raise PretrainedWeightsError(
                f"model.pretrained 'imagenet': smp encoder {encoder!r} has no ImageNet weights (it has: {have})"
            )


def fetch_command(repo: str) -> str:
    """The command that fills the right cache with `repo`'s weights: a Hugging Face repository goes into
    the hub cache; a plain URL (timm models without a hub copy) into torch hub's checkpoints folder."""
    if repo.startswith(("http://", "https://")):
        import torch.hub

        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(repo).path))
        return f"curl -L --create-dirs -o {target} {repo}"
    hub_id, _, revision = repo.partition("@")
    return f"hf download {hub_id}" + (f" --revision {revision}" if revision else "")


@contextlib.contextmanager
def imagenet_weights(spec: ModelSpec, encoder: str, enabled: bool = True) -> Iterator[None]:
    """Around a timm/smp constructor that loads ImageNet weights (when `enabled`): a missing download
    becomes one clear error."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not enabled:
        yield
        return
    try:
        yield
    except (LocalEntryNotFoundError, HfHubHTTPError, urllib.error.URLError, ConnectionError) as err:
        repo = weights_repo(spec, encoder)
        fetch = fetch_command(repo)
        raise PretrainedWeightsError(
            f"model.pretrained 'imagenet': the ImageNet weights of {spec.name!r}"
            f"{f' (encoder {encoder!r})' if spec.builder.endswith('build_smp_segmenter') else ''} ({repo}) are not "
            f"in the local caches and cannot be downloaded here ({type(err).__name__}). Looked in: {hub_caches()}. "
            f"Fill the cache on a machine with network access (`{fetch}`, or run this configuration once there), "
            "copy it here or point HF_HUB_CACHE at it, and set HF_HUB_OFFLINE=1 to use it without network"
        ) from None
