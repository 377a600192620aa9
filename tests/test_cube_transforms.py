"""Windowed cube reads, crops, mask targets, normalisation and augmentations on hand-made cubes
whose every value is known, locally and on an S3 endpoint (moto server)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from thalia_ray.config import AugmentConfig, DataConfig
from thalia_ray.data import schema
from thalia_ray.data.annotations import AnnotationSet, parse_annotation
from thalia_ray.data.cube import (CountingStore, CubeCache, DataError, crop_rng, crop_window, read_raw, read_sample,
                                  reference_window)
from thalia_ray.data.index import SampleIndex, group_rng
from thalia_ray.data.samples import RawSample, Sample, Window
from thalia_ray.data.transforms import augment, finalize, load_statistics, mask_target, normalize
from thalia_ray.storage import local

from tests.helpers import (CHUNK, FRAME, HEIGHT, PRIMARIES, SECONDARIES, WIDTH, cube_dataset, known_value, record,
                           write_cube)


def box(row0, col0, row1, col1):
    """A rectangle polygon in flat (x, y) published order."""
    return (col0, row0, col1, row0, col1, row1, col0, row1)


def annotation_set(records: list[dict]) -> AnnotationSet:
    return AnnotationSet({r["uniqueID"]: parse_annotation(r["uniqueID"], r) for r in records})


def make_sample(uids, secondaries, positive, primary=PRIMARIES[0]) -> Sample:
    return Sample(
        key=f"{FRAME}-{primary}-{'_'.join(map(str, uids))}", frame_id=FRAME, primary_date=primary,
        secondary_dates=tuple(secondaries), unique_ids=tuple(uids), member_positive=tuple(positive),
        label=int(any(positive)), split="train",
    )


# ------------------------------------------------------------------------------- reading
def test_read_raw_returns_known_values_in_channel_order(tmp_path):
    write_cube(str(tmp_path))
    anns = annotation_set([record(1, "20190113", "20190125", False), record(2, "20190113", "20190206", False)])
    sample = make_sample([1, 2], ["20190125", "20190206"], [False, False], primary="20190113")
    channels = schema.channel_names(["dem", "insar_difference"], ["surface_pressure"])
    window = Window(3, 5, 6, 7)
    raw = read_raw(sample, CubeCache(str(tmp_path)), window, channels, anns)

    assert raw.image.shape == (2, 4, 6, 7) and raw.image.dtype == np.float32
    assert raw.mask.shape == (2, 6, 7) and raw.mask.dtype == np.uint8
    rows, cols = np.meshgrid(np.arange(3, 9), np.arange(5, 12), indexing="ij")
    for t, s in enumerate([1, 2]):
        for ci, name in enumerate(channels):
            expected = known_value("dem", 0, 0, rows, cols) if name == "dem" else known_value(name, 1, s, rows, cols)
            np.testing.assert_array_equal(raw.image[t, ci], expected.astype(np.float32))
    assert channels == ["insar_difference", "dem", "primary_date_surface_pressure", "secondary_date_surface_pressure"]
    json.dumps(raw.meta)  # JSON-serialisable
    assert raw.meta["unique_ids"] == [1, 2] and raw.meta["window"] == [3, 5, 6, 7]


def test_windowed_read_fetches_only_touched_chunks(tmp_path):
    write_cube(str(tmp_path))
    cache = CubeCache(str(tmp_path), store_wrapper=CountingStore)
    anns = annotation_set([record(1, "20190101", "20190113", False), record(2, "20190101", "20190206", False)])
    # Padded series: the first pair appears twice but must be fetched once.
    sample = make_sample([1, 1, 2], ["20190113", "20190113", "20190206"], [False] * 3)
    cache.get(FRAME)
    store = cache.stores[FRAME]
    store.reset()
    window = Window(4, 12, 10, 10)  # rows 4..13 → 2 chunk rows; cols 12..21 → 2 chunk cols
    raw = read_raw(sample, cache, window, ["insar_difference", "dem"], anns)

    assert raw.image.shape == (3, 2, 10, 10)
    np.testing.assert_array_equal(raw.image[0], raw.image[1])
    assert dict(store.chunk_reads) == {"insar_difference": 2 * 4, "dem": 4, schema.MASK_VAR: 2 * 4}
    total_chunks = 2 * 3 * (HEIGHT // CHUNK) * (WIDTH // CHUNK)
    assert store.chunk_reads["insar_difference"] < total_chunks
    assert store.bytes_read > 0


def test_cf_packed_variables_read_as_xarray_decodes_them(tmp_path):
    """Plain variables are read straight from Zarr; packed ones (scale factor, integer fill value)
    go through xarray's decoding, so both give the true values and a fill value becomes a NaN error."""
    ds = cube_dataset()
    ds["insar_coherence"][1, 2, 30, 39] = np.nan  # far from the window read first
    encoding = {v: {"chunks": (1, 1, CHUNK, CHUNK) if ds[v].ndim == 4 else (CHUNK, CHUNK)} for v in ds.data_vars}
    encoding["insar_difference"].update(dtype="int32", scale_factor=0.25, _FillValue=-1)
    encoding["insar_coherence"].update(dtype="float32", _FillValue=-7.0)
    ds.to_zarr(local(str(tmp_path)).join(f"{FRAME}.zarr").zarr_store(read_only=False), mode="w",
               encoding=encoding, consolidated=False, write_empty_chunks=True)
    cache = CubeCache(str(tmp_path))
    arrays = cache.get(FRAME).arrays
    assert "dem" in arrays and schema.MASK_VAR in arrays
    assert "insar_difference" not in arrays and "insar_coherence" not in arrays
    anns = annotation_set([record(1, "20190113", "20190206", False)])
    sample = make_sample([1], ["20190206"], [False], primary="20190113")
    raw = read_raw(sample, cache, Window(2, 3, 5, 6), ["insar_difference", "insar_coherence", "dem"], anns)
    rows, cols = np.meshgrid(np.arange(2, 7), np.arange(3, 9), indexing="ij")
    for ci, name in enumerate(["insar_difference", "insar_coherence"]):
        np.testing.assert_array_equal(raw.image[0, ci], known_value(name, 1, 2, rows, cols).astype(np.float32))
    np.testing.assert_array_equal(raw.image[0, 2], known_value("dem", 0, 0, rows, cols).astype(np.float32))
    with pytest.raises(DataError, match=r"insar_coherence.*1 NaN values"):
        read_raw(sample, cache, Window(28, 36, 4, 4), ["insar_coherence"], anns)


def test_missing_date_and_nan_raise_data_error(tmp_path):
    ds = cube_dataset()
    ds["insar_coherence"][0, 1, 10, 10] = np.nan
    write_cube(str(tmp_path), dataset=ds)
    anns = annotation_set([record(1, "20190101", "20190125", False), record(2, "20190101", "20190301", False)])
    cache = CubeCache(str(tmp_path))
    with pytest.raises(DataError, match=r"insar_coherence.*20190101.*20190125.*rows 8:16, cols 8:16"):
        read_raw(make_sample([1], ["20190125"], [False]), cache, Window(8, 8, 8, 8), ["insar_coherence"], anns)
    with pytest.raises(DataError, match=r"20190301.*not in the cube"):
        read_raw(make_sample([2], ["20190301"], [False]), cache, Window(0, 0, 8, 8), ["dem"], anns)
    with pytest.raises(DataError, match="not found|cannot open"):
        CubeCache(str(tmp_path / "nowhere")).get(FRAME)


def test_unwritten_chunks_are_refused_unless_the_cube_declares_them_fill(tmp_path):
    """A deleted mask chunk must not read as "no deformation"; a cube whose variable declares
    `unwritten_chunks: fill_value` reads it as the fill value."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[16:24, 24:32] = 1
    anns = annotation_set([record(1, "20190101", "20190125", True, polygons=[box(16, 24, 23, 31)])])
    sample = make_sample([1], ["20190125"], [True])
    for declared in (False, True):
        root = tmp_path / f"declared-{declared}"
        dataset = cube_dataset({(0, 1): mask})
        if declared:
            dataset[schema.MASK_VAR].attrs["unwritten_chunks"] = "fill_value"
        write_cube(str(root), dataset=dataset)
        (root / f"{FRAME}.zarr" / schema.MASK_VAR / "c" / "0" / "1" / "2" / "3").unlink()  # rows 16:24, cols 24:32
        cache = CubeCache(str(root))
        assert read_raw(sample, cache, Window(0, 0, 8, 8), ["dem"], anns).mask.sum() == 0  # chunks that exist
        if declared:
            assert read_raw(sample, cache, Window(16, 24, 8, 8), ["dem"], anns).mask.sum() == 0
        else:
            with pytest.raises(DataError, match=rf"variable '{schema.MASK_VAR}'.*rows 16:24.*never written"):
                read_raw(sample, cache, Window(16, 24, 8, 8), ["dem"], anns)


def test_reads_from_s3_endpoint(s3_bucket):
    from thalia_ray.storage import S3Options, resolve

    root = resolve(f"{s3_bucket}/thalia", S3Options.from_environment())
    write_cube(root, chunk=(1, 3, HEIGHT // 2, WIDTH))  # few objects: every chunk is one PUT
    anns = annotation_set([record(1, "20190101", "20190125", False)])
    raw = read_raw(make_sample([1], ["20190125"], [False]), CubeCache(root), Window(16, 24, 8, 8),
                   ["insar_difference"], anns)
    rows, cols = np.meshgrid(np.arange(16, 24), np.arange(24, 32), indexing="ij")
    np.testing.assert_array_equal(raw.image[0, 0], known_value("insar_difference", 0, 1, rows, cols))


# --------------------------------------------------------------------------------- crops
def test_crop_keeps_target_mask_inside_and_is_deterministic_for_eval():
    anns = annotation_set([
        record(1, "20190101", "20190113", True, polygons=[box(40, 50, 60, 70)]),
        record(2, "20190101", "20190125", True, polygons=[box(70, 80, 75, 90)]),
        record(3, "20190101", "20190206", False),
    ])
    sample = make_sample([1, 2, 3], SECONDARIES, [True, True, False])
    rng = np.random.default_rng(0)
    windows = {crop_window(sample, anns, (128, 128), 64, rng) for _ in range(50)}
    assert len(windows) > 5  # random offsets
    for w in windows:
        assert (w.height, w.width) == (64, 64)
        assert w.row <= 40 and 75 < w.row + 64 and w.col <= 50 and 90 < w.col + 64
    assert crop_window(sample, anns, (128, 128), 64) == crop_window(sample, anns, (128, 128), 64)
    # 'last' targets member 3 (no mask): a negative's crop, the frame centre ±crop/4 in training (where
    # evaluation crops it), never anywhere else: where a crop lies must not tell the classes apart.
    last = {crop_window(sample, anns, (128, 128), 32, rng, mask_target="last") for _ in range(60)}
    assert all(40 <= w.row <= 56 and 40 <= w.col <= 56 for w in last) and len(last) > 20
    assert crop_window(sample, anns, (128, 128), 32, mask_target="last") == (48, 48, 32, 32)
    # A mask near the border: the crop is clamped inside the frame.
    edge = annotation_set([record(4, "20190101", "20190113", True, polygons=[box(120, 0, 127, 5)])])
    w = crop_window(make_sample([4], ["20190113"], [True]), edge, (128, 128), 64, rng)
    assert w.row == 64 and w.col == 0
    with pytest.raises(ValueError, match="larger than frame"):
        crop_window(sample, anns, (32, 32), 64)


def test_read_sample_crop_contains_whole_cube_mask(tmp_path):
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[20:26, 28:34] = 1
    write_cube(str(tmp_path), masks={(0, 1): mask})
    (tmp_path / "statistics.json").write_text(json.dumps({k: {"mean": 0.0, "std": 1.0} for k in
                                                          ["insar_difference", "insar_coherence", "dem"]}))
    anns = annotation_set([record(1, "20190101", "20190125", True, polygons=[box(20, 28, 25, 33)])])
    cfg = DataConfig(root=str(tmp_path), crop=16, augmentations=False)
    timeseries = {FRAME: {"20190101": {"length": 1, "secondary_date": ["20190125"], "uniqueID": [1]}}}
    index = SampleIndex.build(anns, timeseries, cfg, seed=0)
    [sample] = index.samples("train")
    cache = CubeCache(str(tmp_path))
    stats = load_statistics(tmp_path / "statistics.json")
    for seed in range(10):
        rng = np.random.default_rng(seed)
        rec = finalize(read_sample(sample, index.annotations, cache, cfg, rng), cfg, stats, rng, training=True)
        assert rec["mask"].shape == (16, 16) and rec["mask"].sum() == 36
        assert rec["image"].shape == (3, 16, 16) and rec["label"] == 1


def _centre_offset(window: Window, centre: tuple[int, int]) -> tuple[int, int]:
    return window.row + window.height // 2 - centre[0], window.col + window.width // 2 - centre[1]


def test_reference_crop_holds_a_mask_pixel_near_the_box_centre():
    target = np.zeros((128, 128), dtype=bool)
    target[40:61, 50:71] = True  # box centre (50, 60)
    windows = {reference_window(target, 32, np.random.default_rng(seed)) for seed in range(200)}
    assert len(windows) > 50  # offsets are random
    for w in windows:
        assert (w.height, w.width) == (32, 32) and target[w.row:w.row + 32, w.col:w.col + 32].any()
        assert all(abs(d) <= 8 for d in _centre_offset(w, (50, 60)))  # ±crop/4, nowhere near a border
    # a mask at the corner: clamped inside the frame, still holding mask pixels
    corner = np.zeros((128, 128), dtype=bool)
    corner[0:4, 120:128] = True
    assert {reference_window(corner, 32, np.random.default_rng(seed)) for seed in range(50)} == {Window(0, 96, 32, 32)}


def test_reference_crop_of_a_negative_is_near_the_frame_centre():
    empty = np.zeros((128, 96), dtype=bool)
    windows = {reference_window(empty, 32, np.random.default_rng(seed)) for seed in range(200)}
    assert len(windows) > 50
    assert all(all(abs(d) <= 8 for d in _centre_offset(w, (63, 47))) for w in windows)
    with pytest.raises(ValueError, match="larger than frame F"):
        reference_window(empty, 100, np.random.default_rng(0), "F")


def test_reference_crop_falls_back_to_the_mask_pixel_nearest_the_box_centre():
    sparse = np.zeros((128, 128), dtype=bool)
    sparse[2, 2] = sparse[125, 125] = True  # box centre (63, 63): no ±4 shift of a 16 crop reaches either
    for seed in range(20):
        assert reference_window(sparse, 16, np.random.default_rng(seed)) == Window(0, 0, 16, 16)


def test_reference_crops_are_fixed_per_sample_and_follow_the_cube_mask(tmp_path):
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[20:24, 28:32] = 2  # earthquake counts as deformation; the polygon (elsewhere) is not used
    write_cube(str(tmp_path), masks={(0, 1): mask})
    anns = annotation_set([record(1, "20190101", "20190125", True, polygons=[box(2, 2, 5, 5)]),
                           record(2, "20190101", "20190206", False)])
    sample = make_sample([1, 2], ["20190125", "20190206"], [True, False])
    cache = CubeCache(str(tmp_path))
    cfg = DataConfig(root=str(tmp_path), crop=16, crop_policy="reference")
    windows = {}
    for seed in range(12):
        raws = [read_sample(sample, anns, cache, cfg, crop_rng("reference", seed, sample.key, epoch))
                for epoch in (None, 0, 1, 7)]  # evaluation, then three training epochs
        assert all(r.meta["window"] == raws[0].meta["window"] for r in raws)  # fixed whatever the epoch
        np.testing.assert_array_equal(raws[0].image, raws[-1].image)
        assert raws[0].mask.max() == 2  # the crop holds cube mask pixels
        windows[seed] = Window(*raws[0].meta["window"])
        drow, dcol = _centre_offset(windows[seed], (21, 29))
        assert abs(drow) <= 4 and (abs(dcol) <= 4 or windows[seed].col == WIDTH - 16)  # or clamped
    assert len(set(windows.values())) > 5  # the seed draws the crop
    # mask_target 'last': member 2 has no mask, so the crop is a negative's, around the frame centre
    last = DataConfig(root=str(tmp_path), crop=16, crop_policy="reference", mask_target="last")
    for seed in range(6):
        w = Window(*read_sample(sample, anns, cache, last, crop_rng("reference", seed, sample.key)).meta["window"])
        assert all(abs(d) <= 4 for d in _centre_offset(w, ((HEIGHT - 1) // 2, (WIDTH - 1) // 2)))
    with pytest.raises(ValueError, match="reference crop policy needs"):
        read_sample(sample, anns, cache, cfg)


def test_centred_policy_crops_are_unchanged():
    assert crop_rng("centred", 3, "k") is None  # evaluation: the centred crop
    for epoch in (0, 1):
        np.testing.assert_array_equal(crop_rng("centred", 3, "k", epoch).integers(1 << 30, size=4),
                                      group_rng(3, "sample", epoch, "k").integers(1 << 30, size=4))
    assert DataConfig().crop_policy == "centred"


# ------------------------------------------------------------------------------- targets
def test_mask_targets_and_earthquake_mapping():
    mask = np.zeros((3, 4, 4), dtype=np.uint8)
    mask[0, 0, 0] = 1
    mask[1, 1:3, 1:3] = 2  # earthquake, the largest
    mask[2, 3, 3] = 1
    np.testing.assert_array_equal(mask_target(mask, "last"), mask[2])
    peak = mask_target(mask, "peak")
    assert peak.sum() == 4 and peak.max() == 1
    union = mask_target(mask, "union")
    assert union.sum() == 6 and set(np.unique(union)) == {0, 1}
    assert mask_target(mask, "all").shape == (3, 4, 4) and mask_target(mask, "all").max() == 1
    with pytest.raises(ValueError, match="0, 1 or 2"):
        mask_target(mask + 3, "union")


def raw_sample(member_positive, masks, image=None):
    steps = len(member_positive)
    meta = {
        "frame_id": FRAME, "member_positive": list(member_positive), "confidence": 0.7, "phase": "Unrest",
        "activity_types": [["Dyke", "Sill"] if p else [] for p in member_positive],
        "intensity_levels": [["Low", "High"] if p else [] for p in member_positive],
        "flags": [{**{f: 0 for f in schema.FLAGS}, "atmospheric_fringes": 2} for _ in member_positive],
    }
    if image is None:
        image = np.ones((steps, 3, 8, 8), dtype=np.float32)
    return RawSample(image=image, mask=masks, key="k", meta=meta)


def test_finalize_label_rules_normalisation_and_record():
    stats = {
        "insar_difference": {"mean": 1.0, "std": 2.0}, "insar_coherence": {"mean": 10.0, "std": 5.0},
        "dem": {"mean": 100.0, "std": 50.0}, "surface_pressure": {"mean": 1000.0, "std": 10.0},
    }
    channels = schema.channel_names(["insar_difference", "dem"], ["surface_pressure"])
    assert channels == ["insar_difference", "dem", "primary_date_surface_pressure", "secondary_date_surface_pressure"]
    image = np.zeros((2, 4, 8, 8), dtype=np.float32)
    for ci, value in enumerate([3.0, 200.0, 1010.0, 980.0]):
        image[:, ci] = value
    raw = raw_sample([True, False], np.zeros((2, 8, 8), dtype=np.uint8), image)
    cfg = DataConfig(geomorphology=["insar_difference", "dem"], atmospheric=["surface_pressure"], mask_target="union")
    rec = finalize(raw, cfg, stats, None, training=False)
    assert rec["image"].shape == (8, 8, 8) and rec["image"].dtype == np.float32
    # Time-major stacking: [t0c0, t0c1, t0c2, t0c3, t1c0, ...]; ERA5 primary/secondary share stats.
    np.testing.assert_allclose(rec["image"][:4, 0, 0], [1.0, 2.0, 1.0, -2.0])
    np.testing.assert_allclose(rec["image"][4:, 0, 0], [1.0, 2.0, 1.0, -2.0])
    assert rec["label"] == 1 and rec["mask"].dtype == np.int64 and rec["mask"].shape == (8, 8)
    assert finalize(raw, cfg.model_copy(update={"label_rule": "last"}), stats, None, False)["label"] == 0
    assert rec["aux_activity_type"].tolist() == [0, 1, 1, 0, 0, 0]
    assert rec["aux_intensity"] == schema.INTENSITY_LEVELS.index("High") and rec["intensity"] == "High"
    assert rec["aux_phase"] == schema.PHASES.index("Unrest") and rec["activity_type"] == "Dyke"
    assert rec["aux_fringes"].tolist() == [0, 0, 1, 0] and rec["confidence"] == np.float32(0.7)
    unit = {k: {"mean": 0.0, "std": 1.0} for k in schema.GEOMORPHOLOGY}
    negative = finalize(raw_sample([False], np.zeros((1, 8, 8), np.uint8)), DataConfig(), unit, None, False)
    assert negative["aux_intensity"] == 0 and negative["intensity"] == "None" and negative["activity_type"] == "None"
    with pytest.raises(ValueError, match="no entry for"):
        normalize(image, ["insar_coherence", "primary_date_total_column_water_vapour"], stats)


def test_normalize_equals_the_reference_per_channel_loop_bit_for_bit():
    """A literal transcription of the reference's `utilities/utils.py::normalize` on a float32 tensor."""
    import torch

    channels = ["insar_difference", "dem", "primary_date_total_column_water_vapour",
                "secondary_date_total_column_water_vapour"]
    stats = {"insar_difference": {"mean": 0.1234567891, "std": 1.1}, "dem": {"mean": 812.37, "std": 402.9},
             "total_column_water_vapour": {"mean": -3.3, "std": 0.0123}}
    image = np.random.default_rng(3).normal(50.0, 300.0, size=(3, 4, 16, 16)).astype(np.float32)
    reference = torch.from_numpy(image.copy())
    means = [stats["insar_difference"]["mean"], stats["dem"]["mean"], *[stats["total_column_water_vapour"]["mean"]] * 2]
    stds = [stats["insar_difference"]["std"], stats["dem"]["std"], *[stats["total_column_water_vapour"]["std"]] * 2]
    for i in range(len(means)):
        reference[:, i, :, :] = (reference[:, i, :, :] - means[i]) / stds[i]
    ours = normalize(image, channels, stats)
    assert ours.dtype == np.float32 and np.array_equal(ours, reference.numpy())
    assert not np.shares_memory(ours, image)
    # Through float64 and rounded once, many values would land one float32 step away from the reference's.
    wide = ((image - np.array(means)[None, :, None, None]) / np.array(stds)[None, :, None, None]).astype(np.float32)
    assert not np.array_equal(wide, reference.numpy())


def test_published_statistics_load(shared_meta, tmp_path):
    stats = load_statistics(shared_meta / "statistics.json")
    assert set(stats) == {"insar_difference", "insar_coherence", "dem", *schema.ATMOSPHERIC}


# --------------------------------------------------------------------------- augmentation
ALL_ON = AugmentConfig(hflip=0.5, vflip=0.5, rotate=1.0, rotate_degrees=30, resized_crop=1.0, elastic=1.0,
                       elastic_alpha=3.0, blur=0.0, gaussian_noise=0.0, multiplicative_noise=0.0, cutout=0.0)


def blob_mask(size=48):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[10:30, 14:22] = 1
    mask[32:40, 30:44] = 1
    return mask


def test_geometric_augmentation_keeps_image_and_mask_aligned():
    mask = blob_mask()
    image = np.stack([mask.astype(np.float32), np.full(mask.shape, 5.0, np.float32)])
    for seed in range(20):
        out_image, out_mask = augment(image, mask, ALL_ON, np.random.default_rng(seed))
        assert out_mask.shape == mask.shape and set(np.unique(out_mask)) <= {0, 1}
        # Channel 0 is the mask itself, resampled bilinearly: it must agree with the nearest-neighbour
        # mask wherever it is unambiguous.
        clear = (out_image[0] < 0.25) | (out_image[0] > 0.75)
        agreement = ((out_image[0] > 0.5) == (out_mask == 1))[clear].mean()
        assert agreement > 0.99
        assert out_mask.sum() > 0
    flips = AugmentConfig(hflip=1.0, vflip=1.0)
    out_image, out_mask = augment(image, mask, flips, np.random.default_rng(0))
    np.testing.assert_array_equal(out_mask, mask[::-1, ::-1])
    np.testing.assert_array_equal(out_image[0], mask[::-1, ::-1].astype(np.float32))


def test_each_augmentation_fires_with_its_probability():
    mask = blob_mask()
    image = np.stack([mask.astype(np.float32) + 1.0] * 2)
    none = AugmentConfig(hflip=0, vflip=0)
    same_image, same_mask = augment(image, mask, none, np.random.default_rng(0))
    np.testing.assert_array_equal(same_image, image)
    np.testing.assert_array_equal(same_mask, mask)
    before = image.copy()
    for field in ("blur", "gaussian_noise", "multiplicative_noise", "cutout"):
        cfg = none.model_copy(update={field: 1.0})
        out_image, out_mask = augment(image, mask, cfg, np.random.default_rng(1))
        assert not np.array_equal(out_image, image), field
        np.testing.assert_array_equal(image, before)  # a new array: the sample it came from is unchanged
        np.testing.assert_array_equal(out_mask, mask)  # photometric: mask untouched
    for field in ("rotate", "resized_crop", "elastic"):
        cfg = none.model_copy(update={field: 1.0, "resized_crop_scale": (0.3, 0.5)})
        _, out_mask = augment(image, mask, cfg, np.random.default_rng(1))
        assert not np.array_equal(out_mask, mask), field


def test_finalize_augments_only_when_training_and_all_target_keeps_steps():
    masks = np.stack([blob_mask(), np.zeros((48, 48), np.uint8)])
    image = np.repeat(masks[:, None].astype(np.float32), 3, axis=1)
    raw = raw_sample([True, False], masks, image)
    cfg = DataConfig(mask_target="all", normalize=False, augment=AugmentConfig(hflip=1.0, vflip=0.0))
    train = finalize(raw, cfg, None, np.random.default_rng(0), training=True)
    evaluation = finalize(raw, cfg, None, None, training=False)
    assert train["mask"].shape == (2, 48, 48)
    np.testing.assert_array_equal(evaluation["mask"], masks)
    np.testing.assert_array_equal(train["mask"], masks[..., ::-1])
    np.testing.assert_array_equal(train["image"][0], blob_mask()[:, ::-1])
    with pytest.raises(ValueError, match="random generator"):
        finalize(raw, cfg, None, None, training=True)
