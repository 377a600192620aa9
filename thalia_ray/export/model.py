"""`thalia-ray export-model`: a run's best checkpoint as TorchScript, ONNX or safetensors.

Every export is loaded back the way a user would load it (torch.jit.load, onnxruntime, a fresh
model filled from the safetensors file) and compared with the PyTorch model on fresh random
inputs; a maximum absolute difference above the tolerance fails the export. The exported graph
returns the main task's logits only (auxiliary heads are a training aid).
"""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from thalia_ray.errors import ThaliaError
from thalia_ray.export.card import card_path, model_card
from thalia_ray.predict import inputs
from thalia_ray.storage import Location, local
from thalia_ray.store.layout import ExperimentStore

FORMATS = ("torchscript", "onnx", "safetensors")
TOLERANCE = 1e-4  # max abs difference of fp32 logits
ONNX_OPSET = 17


class ExportError(ThaliaError, RuntimeError):
    """An export that could not be written or does not match the PyTorch model."""


class LogitsOnly(nn.Module):
    """The model with a plain tensor output, which TorchScript and ONNX can carry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)["logits"]


@dataclass
class ExportResult:
    path: str
    card: str
    max_abs_diff: float

    def summary(self) -> str:
        return f"wrote {self.path} (parity: max abs diff {self.max_abs_diff:.2e} ≤ {TOLERANCE:g}) and {self.card}"


def _torchscript(model: LogitsOnly, example: Tensor, path: Path, cfg: Any) -> Callable[[Tensor], np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of torch.export, still the portable file
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input-size check is constant for the crop
        torch.jit.trace(model, example).save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda x: loaded(x).detach().numpy()


def _dynamic_axes(task: str) -> dict[str, dict[int, str]]:
    """Batch, height and width are free; segmentation logits follow the input's height and width."""
    image = {0: "batch", 2: "height", 3: "width"}
    return {"image": image, "logits": image if task == "segmentation" else {0: "batch"}}


def _onnx(model: LogitsOnly, example: Tensor, path: Path, cfg: Any) -> Callable[[Tensor], np.ndarray]:
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes=_dynamic_axes(cfg.model.task))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"image": x.numpy()})[0]


def _safetensors(model: LogitsOnly, example: Tensor, path: Path, cfg: Any) -> Callable[[Tensor], np.ndarray]:
    from safetensors.torch import load_model, save_model

    save_model(model.model, str(path), metadata={"format": "pt", "model": str(cfg.model.name)})
    fresh = inputs.model_from_config(cfg).eval()
    load_model(fresh, str(path))
    return lambda x: fresh(x)["logits"].detach().numpy()


WRITERS = {"torchscript": _torchscript, "onnx": _onnx, "safetensors": _safetensors}


CARD_KEY = "model_card"


def _embed_onnx_card(path: Path, card: dict[str, Any]) -> None:
    """The model card as the ONNX model's metadata (`metadata_props["model_card"]`, JSON), which onnxruntime
    shows as `session.get_modelmeta().custom_metadata_map`: the file describes itself wherever it goes."""
    import onnx

    model = onnx.load(str(path))
    model.metadata_props.add(key=CARD_KEY, value=json.dumps(card))
    onnx.save(model, str(path))


EMBED_CARD = {"onnx": _embed_onnx_card}  # formats whose files carry their card as well as the file beside them


def export_model(model: nn.Module, cfg: Any, fmt: str, path: Path, seed: int = 0) -> float:
    """Write `model` in `fmt` to `path`, reload it and return the max abs difference on random inputs."""
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    wrapped = LogitsOnly(model.eval()).eval()
    generator = torch.Generator().manual_seed(seed)
    shape = (2, cfg.data.length * len(cfg.data.channels), cfg.data.crop, cfg.data.crop)
    example, probe = (torch.randn(shape, generator=generator) for _ in range(2))
    with torch.no_grad():
        run = WRITERS[fmt](wrapped, example, path, cfg)
        expected = wrapped(probe).numpy()
        got = run(probe)
    if got.shape != expected.shape:
        raise ExportError(f"{fmt} export of {cfg.model.name}: output shape {got.shape}, expected {expected.shape}")
    return float(np.abs(got - expected).max())


def export_run(store: ExperimentStore, run_id: str, fmt: str, out: str | Location) -> ExportResult:
    """Export run `run_id`'s best checkpoint to `out` (a Location resolved with the storage settings, or a
    local path) with its model card beside it (and, for ONNX, inside it)."""
    target = local(out)
    card_at = target.parent().join(card_path(target.name))
    cfg, checkpoint, results = inputs.run_checkpoint(store, run_id)
    model = inputs.load_model(cfg, checkpoint)
    with tempfile.TemporaryDirectory(prefix="thalia-export-") as tmp:
        written = Path(tmp) / target.name
        diff = export_model(model, cfg, fmt, written)
        if not diff <= TOLERANCE:
            raise ExportError(f"{fmt} export of run {run_id}: max abs difference {diff:.3g} from the PyTorch model "
                              f"exceeds {TOLERANCE:g}; nothing written")
        parity = {"max_abs_diff": diff, "tolerance": TOLERANCE, "inputs": "2 random normal batches at the crop size"}
        card = model_card(cfg, run_id, fmt, str(out), getattr(model, "input_divisor", 1), inputs.run_statistics(cfg),
                          results, parity)
        if fmt in EMBED_CARD:
            EMBED_CARD[fmt](written, card)
        target.put_file(written)
    card_at.write_text(json.dumps(card, indent=2) + "\n")
    return ExportResult(target.url, card_at.url, diff)
