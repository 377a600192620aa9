"""What chunking costs a sample (the arithmetic behind `prepare chunking`), and `prepare rechunk`, which
must leave every sample exactly as it was while changing only how many chunks it touches."""
from __future__ import annotations

import numpy as np
import pytest

from thalia_ray.config import load_config
from thalia_ray.data.chunking import chunks_per_axis, variable_cost
from thalia_ray.data.cube import CubeCache, read_sample
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.rechunk import rechunk_dataset
from thalia_ray.predict.inputs import frame_ids
from thalia_ray.storage import local

DIMS = ("primary_date", "secondary_date", "y", "x")


@pytest.mark.parametrize("crop, chunk, size, expected", [
    (96, 96, 96, 1.0),  # one chunk holds the frame
    (64, 256, 256, 1.0),  # chunks as large as the frame
    (1, 128, 256, 1.0),  # a pixel is in one chunk
    (128, 128, 256, (2 * 1 + 127 * 2) / 129),  # all but the two aligned starts straddle a boundary
    (96, 128, 256, (66 * 1 + 95 * 2) / 161),  # counted by hand: 66 of 161 starts fit in one chunk
])
def test_chunks_per_axis_is_the_mean_over_every_crop_position(crop, chunk, size, expected):
    assert chunks_per_axis(crop, chunk, size) == pytest.approx(expected)


def test_a_sample_costs_its_planes_times_the_chunks_under_the_crop():
    per_pair = variable_cost("insar_difference", DIMS, (10, 40, 256, 256), (1, 1, 128, 128), 4, 96, 3)
    static = variable_cost("dem", ("y", "x"), (256, 256), (128, 128), 4, 96, 3)
    assert per_pair.planes == 3 and static.planes == 1
    assert per_pair.gets == pytest.approx(3 * chunks_per_axis(96, 128, 256) ** 2)
    assert static.gets == pytest.approx(chunks_per_axis(96, 128, 256) ** 2)
    assert per_pair.bytes == pytest.approx(per_pair.gets * 128 * 128 * 4)
    several = variable_cost("v", DIMS, (10, 40, 256, 256), (1, 4, 256, 256), 4, 96, 3)
    assert several.planes == 1 and several.gets == 1  # three pairs in one chunk, one chunk per plane


def _samples(root: str) -> list:
    cfg = load_config(None, [f"data.root={root}", "data.length=3", "data.crop=40"])
    index = SampleIndex.from_config(cfg.data, 0)
    cache = CubeCache(root)
    return [read_sample(s, index.annotations, cache, cfg.data) for split in ("train", "val", "test")
            for s in index.samples(split)]


def test_rechunked_cubes_hold_every_sample_unchanged_and_only_the_pairs_written(synthetic_root, tmp_path):
    import zarr

    out = tmp_path / "rechunked"
    report = rechunk_dataset(local(str(synthetic_root)), local(str(out)), 32, frame_ids(str(synthetic_root)))
    assert len(report.cubes) == 3 and "annotations.json" in report.files and report.planes > 0
    before, after = _samples(str(synthetic_root)), _samples(str(out))
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert a.key == b.key
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
    cube = report.cubes[0]
    old, new = zarr.open_group(str(synthetic_root / cube), mode="r"), zarr.open_group(str(out / cube), mode="r")
    assert new["insar_difference"].chunks == (1, 1, 32, 32) and new["dem"].chunks == (32, 32)
    written = [p for p in (out / cube / "insar_difference" / "c").rglob("*") if p.is_file()]
    pairs = {p.relative_to(out / cube / "insar_difference" / "c").parts[:2] for p in written}
    old_pairs = {p.relative_to(synthetic_root / cube / "insar_difference" / "c").parts[:2]
                 for p in (synthetic_root / cube / "insar_difference" / "c").rglob("*") if p.is_file()}
    assert pairs == old_pairs  # the sparse date grid stays sparse
    assert old["insar_difference"].shape == new["insar_difference"].shape
