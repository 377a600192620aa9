"""The model card: what someone needs to run an exported model without thalia-ray, as JSON."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

from thalia_ray.config import ThaliaConfig
from thalia_ray.predict.frame_metrics import DEFAULT_THRESHOLD
from thalia_ray.predict.inputs import schema


def card_path(out: str) -> str:
    """`model.onnx` → `model.card.json`, beside the exported file."""
    folder, _, name = out.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{folder}/{stem}.card.json" if folder else f"{stem}.card.json"


def model_card(cfg: ThaliaConfig, run_id: str, fmt: str, file: str, input_divisor: int,
               statistics: Mapping[str, Mapping[str, float]] | None, results: Mapping[str, Any],
               parity: Mapping[str, Any]) -> dict[str, Any]:
    """The card of one export; `statistics` are the per-channel mean/std the run normalised with."""
    data, channels, steps = cfg.data, list(cfg.data.channels), cfg.data.length
    per_channel = None
    if statistics is not None:
        per_channel = {c: dict(statistics[schema.statistics_key(c)]) for c in channels}
    task = cfg.model.task
    return {
        "run_id": run_id,
        "format": fmt,
        "file": file.rpartition("/")[2],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": task,
        "model": {"name": cfg.model.name, "encoder": cfg.model.encoder if task == "segmentation" else None},
        "input": {
            "name": "image", "dtype": "float32",
            "shape": ["batch", steps * len(channels), data.crop, data.crop],
            "channels": channels, "time_steps": steps, "crop": data.crop,
            "layout": "time-major: input channel t * C + c holds channel c of interferogram t (oldest first)",
            "spatial_size": f"trained and checked at {data.crop}²; the network takes heights and widths that are "
                            f"multiples of {input_divisor}",
        },
        "normalisation": None if per_channel is None else {
            "formula": "(x - mean) / std per channel, before stacking", "statistics": per_channel},
        "output": {
            "name": "logits", "dtype": "float32",
            "shape": ["batch", len(schema.CLASSES), *(("height", "width") if task == "segmentation" else ())],
            "classes": list(schema.CLASSES), "probability": "softmax over the class axis; index 1 is Deformation",
        },
        "threshold": DEFAULT_THRESHOLD,
        "training_data": {"root": data.root, "splits": {k: [str(v.start), str(v.end)] for k, v in data.splits.items()},
                          "mask_target": data.mask_target, "label_rule": data.label_rule, "policy": data.policy,
                          "frames": data.frames},
        "metrics": dict(results.get("metrics", {})),
        "best_epoch": results.get("best_epoch"),
        "parity": dict(parity),
    }
