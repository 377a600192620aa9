"""Whole-frame inference: windows and blending as units, then the Ray Data job end to end.

The job tests share one small synthetic dataset (72-px frames, not a multiple of the 32-px crop)
and one stored run; each job runs over one frame to keep the suite short on a loaded machine.
"""
from __future__ import annotations

import math
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xarray as xr

from tests.helpers import stored_run, upload_folder
from thalia_ray.predict.windows import Stitcher, blend_weights, tile

CROP, OVERLAP = 32, 0.25


# ------------------------------------------------------------------------------ windows
@pytest.mark.parametrize("shape", [(72, 72), (100, 37), (20, 50), (32, 65)])
def test_windows_cover_every_pixel_of_frames_not_a_multiple_of_the_crop(shape):
    windows = tile(shape, CROP, OVERLAP)
    cover = np.zeros(shape, dtype=int)
    for w in windows:
        assert w.row >= 0 and w.col >= 0 and w.row + w.height <= shape[0] and w.col + w.width <= shape[1]
        assert (w.height, w.width) == (min(CROP, shape[0]), min(CROP, shape[1]))
        cover[w.row:w.row + w.height, w.col:w.col + w.width] += 1
    assert cover.min() >= 1
    for axis in (0, 1):  # neighbouring windows overlap by at least the requested fraction
        starts = sorted({w[axis] for w in windows})
        assert all(b - a <= CROP - math.ceil(OVERLAP * CROP) for a, b in zip(starts, starts[1:]))


def test_blend_weights_are_positive_and_fall_towards_the_edges():
    weights = blend_weights(CROP, OVERLAP)
    assert weights.min() > 0 and weights.max() == 1.0
    assert weights[0, 0] < weights[0, CROP // 2] < weights[CROP // 2, CROP // 2]


def _stitched(predict, image: np.ndarray) -> np.ndarray:
    """Run `predict` (C, crop, crop) → (crop, crop) over the windows of `image` and blend them."""
    stitcher = Stitcher(image.shape[-2:], len(tile(image.shape[-2:], CROP, OVERLAP)), blend_weights(CROP, OVERLAP))
    for w in tile(image.shape[-2:], CROP, OVERLAP):
        patch = np.zeros((image.shape[0], CROP, CROP), dtype=np.float32)
        patch[:, :w.height, :w.width] = image[:, w.row:w.row + w.height, w.col:w.col + w.width]
        stitcher.add(w, predict(patch))
    return stitcher.result()


def test_stitched_fully_convolutional_segmenter_equals_a_whole_frame_pass():
    """A pointwise segmenter sees no context, so its windows must blend back to the whole-frame pass."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1)).eval()

    def probability(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)[None]).softmax(1)[0, 1].numpy()

    image = np.random.default_rng(0).normal(size=(3, 75, 90)).astype(np.float32)
    np.testing.assert_allclose(_stitched(probability, image), probability(image), atol=1e-6)


def test_an_incomplete_frame_is_refused():
    stitcher = Stitcher((40, 40), 4, blend_weights(CROP, OVERLAP))
    stitcher.add(tile((40, 40), CROP, OVERLAP)[0], np.ones((CROP, CROP), np.float32))
    with pytest.raises(ValueError, match="1 of 4 windows"):
        stitcher.result()


# ------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from thalia_ray.synthetic.generator import synthesize

    root = tmp_path_factory.mktemp("predict") / "thalia"
    synthesize(str(root), frames=2, size=72, seed=3, max_groups_per_frame=2)
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    return stored_run(tmp_path_factory.mktemp("predict-store"), dataset)


@pytest.fixture(scope="module")
def frame(dataset) -> str:
    from thalia_ray.predict.inputs import frame_ids

    return frame_ids(dataset)[0]


def _predict(run, data, out, frame, **options):
    from thalia_ray.predict.job import PredictOptions, predict
    from thalia_ray.storage import Location

    store, run_id = run
    data, out = (where if isinstance(where, Location) else str(where) for where in (data, out))  # buckets come resolved
    return predict(store, run_id, PredictOptions(data=data, out=out, frames=[frame], progress=False, **options))


def _reference(run, data: Path, frame: str, unit) -> np.ndarray:
    """The unit's probability map computed here, window by window, with the run's model and statistics."""
    from thalia_ray.predict import inputs

    store, run_id = run
    cfg, checkpoint, _ = inputs.run_checkpoint(store, run_id)
    model = inputs.load_model(cfg, checkpoint).eval()
    stack = inputs.read_stack(inputs.open_cube(data, frame), unit.primary_date, unit.secondary_dates, cfg.data.channels)
    image = inputs.normalize(stack, cfg.data.channels, inputs.run_statistics(cfg)).reshape(-1, *stack.shape[-2:])

    def probability(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)[None])["logits"].softmax(1)[0, 1].numpy()

    return _stitched(probability, image)


def _day(text: str) -> np.datetime64:
    return np.datetime64(f"{text[:4]}-{text[4:6]}-{text[6:]}")


def _date(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


@pytest.fixture(scope="module")
def first(ray_cluster, run, dataset, frame, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict-out") / "out"
    return out, _predict(run, dataset, out, frame)


def test_predict_writes_aligned_probabilities_a_table_and_the_evaluation(first, run, dataset, frame):
    from thalia_ray.predict.output import read_table
    from thalia_ray.predict.plan import plan_units
    from thalia_ray.store.records import format_run

    out, report = first
    units = plan_units(str(dataset), "annotated", 1, [frame])
    assert report.failed == {} and report.written == report.planned == len(units) > 0
    assert 0 < report.first_unit_s < report.seconds  # the start-up a throughput figure leaves out
    source, result = xr.open_zarr(dataset / f"{frame}.zarr"), xr.open_zarr(out / f"{frame}.zarr")
    for dim in ("primary_date", "secondary_date", "y", "x"):
        np.testing.assert_array_equal(result[dim].values, source[dim].values)
    assert source.attrs["Conventions"] == "CF-1.8"  # the input's CF attributes describe the output's grid too
    assert {k: result.attrs[k] for k in source.attrs if k not in ("source",)} == {
        k: v for k, v in source.attrs.items() if k != "source"}
    probability = result["deformation_probability"]
    assert probability.dtype == np.float16 and probability.dims == ("primary_date", "secondary_date", "y", "x")
    written = np.isfinite(probability.values).all(axis=(2, 3))
    assert written.sum() == len(units)  # every planned pair, nothing else
    unit = units[0]
    values = probability.sel(primary_date=_day(unit.primary_date),
                             secondary_date=_day(unit.secondary_dates[0])).values.astype(np.float32)
    np.testing.assert_allclose(values, _reference(run, dataset, frame, unit), atol=1e-3)
    rows = read_table(out)
    assert [r["key"] for r in rows] == [u.key for u in units]
    table = pd.read_parquet(out / "predictions.parquet")
    assert table["primary_date"].tolist() == [_date(u.primary_date) for u in units]  # dates, not text
    assert pa.types.is_date32(pq.read_schema(out / "predictions.parquet").field("primary_date").type)
    row = rows[0]
    assert row["secondary_dates"] == [_date(d) for d in units[0].secondary_dates]
    assert row["max_probability"] == pytest.approx(float(values.max()), abs=1e-3)
    assert row["area_above_threshold"] == int((values >= 0.5).sum())
    assert row["annotated_label"] == unit.label and row["predicted_label"] == int(row["max_probability"] >= 0.5)
    evaluation = report.evaluation
    assert evaluation is not None and set(evaluation["per_frame"]) == {frame}
    assert evaluation["overall"]["n"] == len(units) and 0 <= evaluation["overall"]["f1"] <= 1
    store, run_id = run
    assert "whole-frame evaluation" in format_run(store.run(run_id))


def test_a_rerun_after_a_kill_skips_complete_units_and_completes_the_rest(first, run, dataset, frame, tmp_path):
    import zarr

    from thalia_ray.predict.output import DONE, VARIABLE

    out, report = first
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    records = sorted((resumed / DONE / frame).glob("*.json"))
    assert len(records) >= 2
    lost = records[:2]  # the state a kill leaves: the last units have no completion record, maybe no values
    for record in lost:
        record.unlink()
    untouched = {r: r.stat().st_mtime_ns for r in records[2:]}
    # Blank every value: complete units must not be recomputed, so only the two lost ones come back.
    zarr.open_group(str(resumed / f"{frame}.zarr"), mode="r+")[VARIABLE][:] = np.nan
    again = _predict(run, dataset, resumed, frame)
    assert (again.skipped, again.written, again.failed) == (report.planned - 2, 2, {})
    assert all(r.exists() for r in lost) and {r: r.stat().st_mtime_ns for r in records[2:]} == untouched
    restored = zarr.open_group(str(resumed / f"{frame}.zarr"), mode="r")[VARIABLE][:]
    assert np.isfinite(restored).all(axis=(2, 3)).sum() == 2


def test_an_unreadable_pair_is_reported_by_name_and_the_others_are_written(ray_cluster, run, dataset, frame, tmp_path):
    from thalia_ray.predict.output import read_table
    from thalia_ray.predict.plan import plan_units

    data = tmp_path / "thalia"
    shutil.copytree(dataset, data)
    bad = plan_units(str(data), "annotated", 1, [frame])[0]
    source = xr.open_zarr(data / f"{frame}.zarr")
    p = list(source.indexes["primary_date"].strftime("%Y%m%d")).index(bad.primary_date)
    s = list(source.indexes["secondary_date"].strftime("%Y%m%d")).index(bad.secondary_dates[0])
    chunks = list((data / f"{frame}.zarr" / "insar_coherence" / "c" / str(p) / str(s)).rglob("*"))
    for chunk in (c for c in chunks if c.is_file()):
        chunk.write_bytes(b"not a zstd frame")
    report = _predict(run, data, tmp_path / "out", frame)
    assert set(report.failed) == {bad.key} and "insar_coherence" in report.failed[bad.key]
    assert report.written == report.planned - 1
    assert bad.key not in {r["key"] for r in read_table(tmp_path / "out")}


def test_predict_reads_and_writes_s3_on_the_moto_server(ray_cluster, run, dataset, frame, s3_bucket):
    from thalia_ray.predict.output import read_table
    from thalia_ray.storage import S3Options, resolve

    settings = S3Options.from_environment()
    data, out = resolve(f"{s3_bucket}/thalia", settings), resolve(f"{s3_bucket}/predictions", settings)
    upload_folder(dataset, data.url)  # every frame's cube; the job reads only `frame`
    report = _predict(run, data, out, frame)
    assert report.failed == {} and report.written == report.planned > 0
    assert len(read_table(out)) == report.planned
    result = xr.open_zarr(out.join(f"{frame}.zarr").zarr_store())
    np.testing.assert_array_equal(result["y"].values, xr.open_zarr(dataset / f"{frame}.zarr")["y"].values)


def test_series_of_a_classifier_become_heat_maps_on_the_series_grid(ray_cluster, dataset, frame, tmp_path):
    from thalia_ray.predict.output import read_table
    from thalia_ray.predict.plan import plan_units

    run = stored_run(tmp_path / "store", dataset, task="classification", length=3)
    report = _predict(run, dataset, tmp_path / "out", frame, pairs="all")
    units = plan_units(str(dataset), "all", 3, [frame])
    assert report.failed == {} and report.written == len(units) > 0
    result = xr.open_zarr(tmp_path / "out" / f"{frame}.zarr")
    probability = result["deformation_probability"]
    assert probability.dims == ("series", "y", "x") and np.isfinite(probability.values).all()
    days = result["secondary_date"].dt.strftime("%Y%m%d").values
    assert [tuple(row) for row in days] == [u.secondary_dates for u in units]
    assert result.attrs["Conventions"] == "CF-1.8" and result["primary_date"].attrs["long_name"] == "primary date"
    np.testing.assert_array_equal(result["x"].values, xr.open_zarr(dataset / f"{frame}.zarr")["x"].values)
    rows = read_table(tmp_path / "out")
    assert [r["annotated_label"] for r in rows] == [u.label for u in units]
    assert [tuple(d.strftime("%Y%m%d") for d in r["secondary_dates"]) for r in rows] == [u.secondary_dates
                                                                                        for u in units]


def test_the_command_reports_the_job_as_one_json_document(ray_cluster, run, dataset, frame, tmp_path, capsys):
    """Ray prints to the driver's stdout from its own threads: with --json, stdout still holds the report only."""
    import json

    from thalia_ray.cli import main

    store, run_id = run
    assert main(["predict", run_id, "--store", store.root.path, "--data", str(dataset), "--out", str(tmp_path / "out"),
                 "--frames", frame, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_id"] == run_id and report["failed"] == {} and report["written"] == report["planned"] > 0
    assert report["evaluation"] is None or 0 <= report["evaluation"]["overall"]["f1"] <= 1


def test_a_signal_ends_predict_after_whole_units_and_the_rerun_writes_only_the_others(
        ray_cluster, run, dataset, frame, tmp_path, monkeypatch):
    import re

    from thalia_ray import interrupts
    from thalia_ray.interrupts import SIGNAL_AT_ENV, Interrupted
    from thalia_ray.predict.output import DONE

    monkeypatch.setenv(SIGNAL_AT_ENV, "SIGINT:after-unit:1")
    with interrupts.handling(), pytest.raises(Interrupted) as stopped:
        _predict(run, dataset, tmp_path / "out", frame, batch_size=2)
    counts = re.search(r"interrupted by SIGINT: (\d+) of (\d+) units written \(kept\); rerun the same command",
                       str(stopped.value))
    assert counts and stopped.value.exit_code == 130, str(stopped.value)
    written, planned = int(counts[1]), int(counts[2])
    assert 1 <= written < planned
    assert len(list((tmp_path / "out" / DONE / frame).glob("*.json"))) == written  # each with its record
    monkeypatch.delenv(SIGNAL_AT_ENV)
    again = _predict(run, dataset, tmp_path / "out", frame)
    assert (again.skipped, again.written, again.failed) == (written, planned - written, {})
