"""The synthetic dataset: cube schema, annotations and index, statistics, determinism, real-annotation
mode and S3 output."""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from thalia_ray.config import ConfigError
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationError
from thalia_ray.synthetic.catalogue import benchmark_split
from thalia_ray.synthetic.generator import synthesize
from thalia_ray.storage import S3Options, local, resolve


def _day(text: str) -> np.datetime64:
    return np.datetime64(f"{text[:4]}-{text[4:6]}-{text[6:]}", "ns")


def _open(path: Path | str) -> xr.Dataset:
    return xr.open_zarr(local(str(path)).zarr_store(read_only=True), consolidated=True)


def _load(root: Path) -> tuple[dict, dict]:
    return json.loads((root / schema.ANNOTATIONS_FILE).read_text()), json.loads((root / schema.TIMESERIES_FILE).read_text())


def test_cube_schema_and_series_access(synthetic_root):
    annotations, index = _load(synthetic_root)
    frame, groups = next(iter(index.items()))
    ds = _open(synthetic_root / f"{frame}.zarr")
    assert ds.attrs["frame_id"] == frame and ds.attrs["pass_direction"] in ("ascending", "descending")
    assert ds.attrs["generator_version"] and ds.attrs["seed"] == 0
    assert set(schema.DATA_VARS) <= set(ds.data_vars)
    for name in schema.DATA_VARS:
        var = ds[name]
        expected_dims = (schema.Y_DIM, schema.X_DIM) if name == "dem" else (
            schema.PRIMARY_DIM, schema.SECONDARY_DIM, schema.Y_DIM, schema.X_DIM)
        assert var.dims == expected_dims
        assert var.dtype == (np.uint8 if name == schema.MASK_VAR else np.float32)
        assert var.attrs["units"] == schema.UNITS[schema.statistics_key(name)] and var.attrs["long_name"]
        assert var.encoding["chunks"][-2:] == (96, 96)
    assert ds[schema.PRIMARY_DIM].dtype == np.dtype("datetime64[ns]")
    frame_records = [r for r in annotations.values() if r["frameID"] == frame]
    assert list(ds[schema.PRIMARY_DIM].values) == sorted({_day(r["primary_date"]) for r in frame_records})
    primary, group = max(groups.items(), key=lambda kv: kv[1]["length"])
    series = ds.sel(primary_date=_day(primary), secondary_date=[_day(s) for s in group["secondary_date"]])
    phase = series["insar_difference"].values
    assert phase.shape == (group["length"], 96, 96) and np.isfinite(phase).all()
    assert (phase >= -np.pi).all() and (phase < np.pi).all()
    coherence = series["insar_coherence"].values
    assert coherence.min() >= 0 and coherence.max() <= 255
    assert series["dem"].shape == (96, 96)
    existing = {(r["primary_date"], r["secondary_date"]) for r in frame_records}
    missing = next((p, s) for p in sorted({r["primary_date"] for r in frame_records})
                   for s in sorted({r["secondary_date"] for r in frame_records}) if (p, s) not in existing)
    assert np.isnan(ds["insar_difference"].sel(primary_date=_day(missing[0]), secondary_date=_day(missing[1]))).all()


def test_labels_masks_and_splits_agree(synthetic_root):
    annotations, index = _load(synthetic_root)
    positives = Counter()
    for frame in index:
        ds = _open(synthetic_root / f"{frame}.zarr")
        for record in (r for r in annotations.values() if r["frameID"] == frame):
            mask = ds[schema.MASK_VAR].sel(primary_date=_day(record["primary_date"]),
                                           secondary_date=_day(record["secondary_date"])).values
            positive = record["label"] != [schema.NEGATIVE_LABEL]
            assert mask.any() == positive, record["uniqueID"]
            if positive:
                positives[benchmark_split(record["primary_date"])] += 1
                assert set(np.unique(mask)) - {0} <= ({2} if record["label"] == ["Earthquake"] else {1, 2})
    assert set(positives) == set(schema.SPLITS)
    lengths = {g["length"] for groups in index.values() for g in groups.values()}
    assert len(lengths) >= 3
    ids = {str(u) for groups in index.values() for g in groups.values() for u in g["uniqueID"]}
    assert ids <= set(annotations)


def test_sampled_frames_keep_the_real_pixel_spacing(synthetic_root):
    """Sampled frames are 96 px windows at the real 100 m spacing: polygons in real pixels inside the
    frame, deformation masks as large in pixels as on the real data (a 100 km frame squeezed into
    96 px would shrink the median 23 px footprint to ~2 px), and a sensible DEM on a partial edifice."""
    annotations, index = _load(synthetic_root)
    areas, extents = [], []
    for frame in index:
        ds = _open(synthetic_root / f"{frame}.zarr")
        assert ds.attrs["pixel_spacing_m"] == 100.0
        dem = ds["dem"].values
        assert np.isfinite(dem).all() and dem.std() > 1.0 and dem.max() > 0
        for record in (r for r in annotations.values() if r["frameID"] == frame and r["segmentation_mask"]):
            mask = ds[schema.MASK_VAR].sel(primary_date=_day(record["primary_date"]),
                                           secondary_date=_day(record["secondary_date"])).values
            areas.append(int((mask > 0).sum()))
            for polygon in record["segmentation_mask"]:
                xy = np.asarray(polygon).reshape(-1, 2)
                assert (xy >= 0).all() and (xy <= 95).all(), record["uniqueID"]
                extents.append(float(np.ptp(xy, axis=0).max()))
    assert len(areas) >= 10
    assert 20 <= np.median(areas) <= 0.5 * 96 * 96
    assert 10 <= np.median(extents) <= 60  # real polygons: median major extent 23 px of 100 m


def test_statistics_match_the_real_dataset(tmp_path, shared_meta):
    """Generated channel statistics against the real statistics.json.

    Tolerance: a normalised synthetic channel (z-scored with the *real* statistics, as training does)
    must have |mean| ≤ 0.5 and a std within ×2 of 1. That keeps models trained on synthetic data in
    the input range of the real data, while a physics or unit slip (cm vs m, Pa vs hPa, 0–1 vs 0–255
    coherence, unwrapped phase) is off by an order of magnitude and fails.
    """
    synthesize(str(tmp_path), frames=12, size=32, seed=5, max_groups_per_frame=3)
    generated = json.loads((tmp_path / schema.STATISTICS_FILE).read_text())
    real = json.loads((shared_meta / schema.STATISTICS_FILE).read_text())
    assert list(generated) == list(real)
    for key, stats in real.items():
        z_mean = (generated[key]["mean"] - stats["mean"]) / stats["std"]
        ratio = generated[key]["std"] / stats["std"]
        assert abs(z_mean) <= 0.5 and 0.5 <= ratio <= 2.0, (key, generated[key], stats)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_across_workers_and_different_seed_differs(tmp_path):
    synthesize(str(tmp_path / "a"), frames=2, size=32, seed=7, max_groups_per_frame=3)
    synthesize(str(tmp_path / "b"), frames=2, size=32, seed=7, max_groups_per_frame=3, workers=2)
    synthesize(str(tmp_path / "c"), frames=2, size=32, seed=8, max_groups_per_frame=3)
    a, b, c = (_tree(tmp_path / n) for n in "abc")
    assert a == b and len(a) > 20
    chunks_a = {k: v for k, v in a.items() if "insar_difference/c/" in k}
    assert chunks_a and not set(chunks_a.items()) & set(c.items())


def test_from_real_annotations_reproduces_records_and_groups(tmp_path, shared_meta):
    real = json.loads(gzip.decompress((shared_meta / "annotations.json.gz").read_bytes()))
    real_index = json.loads((shared_meta / schema.TIMESERIES_FILE).read_text())
    frames = sorted(real_index)[:3]
    report = synthesize(str(tmp_path), size=40, meta_dir=str(shared_meta), frame_ids=frames, max_groups_per_frame=3)
    annotations, index = _load(tmp_path)
    assert report.frames == 3 and report.groups == 9 and report.pairs == len(annotations)
    assert set(index) == set(frames)
    for frame in frames:
        assert len(index[frame]) == 3
        for primary, group in index[frame].items():
            assert group == real_index[frame][primary]
            assert {benchmark_split(p) for p in index[frame]} == {benchmark_split(p) for p in real_index[frame]} & set(schema.SPLITS)
    wanted = {str(u) for groups in index.values() for g in groups.values() for u in g["uniqueID"]}
    assert set(annotations) == wanted
    for key, record in annotations.items():
        original = real[key]
        assert {k: v for k, v in record.items() if k != "segmentation_mask"} == {
            k: v for k, v in original.items() if k != "segmentation_mask"}
        for ours, theirs in zip(record["segmentation_mask"], original["segmentation_mask"], strict=True):
            np.testing.assert_allclose(ours, np.asarray(theirs) * 40 / schema.PUBLISHED_FRAME_SIZE, rtol=1e-12)
    for frame in frames:
        ds = _open(tmp_path / f"{frame}.zarr")
        assert ds.sizes[schema.Y_DIM] == 40  # the published extent in coarser pixels
        assert ds.attrs["pixel_spacing_m"] == pytest.approx(schema.PUBLISHED_FRAME_SIZE * 100.0 / 40)


def test_whole_real_frame_keeps_every_record(tmp_path, shared_meta):
    real_index = json.loads((shared_meta / schema.TIMESERIES_FILE).read_text())
    frame = min(real_index, key=lambda f: sum(g["length"] for g in real_index[f].values()))
    synthesize(str(tmp_path), size=24, meta_dir=str(shared_meta), frame_ids=[frame])
    annotations, index = _load(tmp_path)
    assert index == {frame: real_index[frame]}
    real = json.loads(gzip.decompress((shared_meta / "annotations.json.gz").read_bytes()))
    assert set(annotations) == {k for k, r in real.items() if r["frameID"] == frame}


def test_bad_input_is_named(tmp_path, shared_meta):
    with pytest.raises(ConfigError, match="--frame-ids: frame.*NOPE_FRAME"):
        synthesize(str(tmp_path), meta_dir=str(shared_meta), frame_ids=["NOPE_FRAME"])
    with pytest.raises(AnnotationError, match="--from-annotations .*empty: no annotations.json"):
        synthesize(str(tmp_path), meta_dir=str(tmp_path / "empty"))


def test_writes_to_s3_and_reads_back(s3_bucket):
    root = resolve(f"{s3_bucket}/synthetic", S3Options.from_environment())
    report = synthesize(root, frames=1, size=32, seed=1, max_groups_per_frame=2)
    index = root.join(schema.TIMESERIES_FILE).read_json()
    annotations = root.join(schema.ANNOTATIONS_FILE).read_json()
    assert set(root.join(schema.STATISTICS_FILE).read_json()) == {schema.statistics_key(c) for c in schema.ALL_CHANNELS}
    (frame,) = index
    ds = xr.open_zarr(root.join(f"{frame}.zarr").zarr_store(read_only=True), consolidated=True)
    record = next(iter(annotations.values()))
    pair = ds.sel(primary_date=_day(record["primary_date"]), secondary_date=_day(record["secondary_date"]))
    assert np.isfinite(pair["insar_difference"].values).all() and report.pairs == len(annotations)
