"""Model export: each format loaded back as a user would and compared with the PyTorch model; the card."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import stored_run


@pytest.fixture(scope="module")
def run(synthetic_root, tmp_path_factory):
    return stored_run(tmp_path_factory.mktemp("export-store"), synthetic_root, length=2)


@pytest.mark.parametrize("fmt, suffix", [("torchscript", "pt"), ("onnx", "onnx"), ("safetensors", "safetensors")])
def test_each_format_matches_the_pytorch_model_and_gets_a_card(run, tmp_path, fmt, suffix):
    from thalia_ray.data.locations import DataLocations
    from thalia_ray.storage import S3Options
    from thalia_ray.data.transforms import statistics_for
    from thalia_ray.export.model import TOLERANCE, export_run
    from thalia_ray.predict import inputs

    store, run_id = run
    out = tmp_path / f"model.{suffix}"
    result = export_run(store, run_id, fmt, str(out))
    assert out.is_file() and result.max_abs_diff <= TOLERANCE
    cfg, checkpoint, results = inputs.run_checkpoint(store, run_id)
    model = inputs.load_model(cfg, checkpoint).eval()
    x = torch.randn(3, 6, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x)["logits"].numpy()
    if fmt == "torchscript":
        got = torch.jit.load(str(out))(x).detach().numpy()
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
        embedded = json.loads(session.get_modelmeta().custom_metadata_map["model_card"])  # the file describes itself
        assert embedded == json.loads((tmp_path / "model.card.json").read_text())
    else:
        from safetensors.torch import load_file

        fresh = inputs.model_from_config(cfg).eval()
        fresh.load_state_dict(load_file(str(out)))
        with torch.no_grad():
            got = fresh(x)["logits"].numpy()
    assert np.abs(got - expected).max() <= TOLERANCE
    card = json.loads((tmp_path / "model.card.json").read_text())
    assert card["format"] == fmt and card["input"]["time_steps"] == 2 and card["input"]["crop"] == 32
    assert card["input"]["channels"] == ["insar_difference", "insar_coherence", "dem"]
    assert card["input"]["shape"] == ["batch", 6, 32, 32] and card["output"]["classes"][1] == "Deformation"
    assert card["normalisation"]["statistics"]["dem"] == statistics_for(DataLocations.of(cfg.data, S3Options.of(cfg.storage)).statistics)["dem"]
    assert card["metrics"] == results["metrics"] and card["threshold"] == 0.5
    assert card["parity"]["max_abs_diff"] == result.max_abs_diff


def test_an_export_that_differs_from_the_model_is_refused(run, tmp_path, monkeypatch):
    from thalia_ray.export import model as export

    def drifting(model, example, path, cfg):  # a writer whose reloaded model is off by 1e-3
        path.write_bytes(b"x")
        return lambda x: model(x).detach().numpy() + 1e-3

    monkeypatch.setitem(export.WRITERS, "onnx", drifting)
    store, run_id = run
    with pytest.raises(export.ExportError, match="exceeds 0.0001; nothing written"):
        export.export_run(store, run_id, "onnx", str(tmp_path / "model.onnx"))
    assert not (tmp_path / "model.onnx").exists()


def test_the_command_reports_the_export_as_one_json_document(run, tmp_path, capsys):
    from thalia_ray.cli import main
    from thalia_ray.export.model import TOLERANCE

    store, run_id = run
    out = tmp_path / "model.safetensors"
    assert main(["export-model", run_id, "--format", "safetensors", "--out", str(out), "--store", store.root.path,
                 "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["path"].endswith(str(out)) and out.is_file() and 0 <= written["max_abs_diff"] <= TOLERANCE
    assert json.loads(out.with_suffix(".card.json").read_text())["run_id"] == run_id
