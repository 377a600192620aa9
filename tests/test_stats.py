"""Normalisation statistics: exact parallel merge, and Ray tasks over a hand-made dataset."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import DataError
from thalia_ray.data.stats import Moments, compute_statistics, merge_partials
from thalia_ray.storage import local

from tests.helpers import FRAME, cube_dataset, local_locations, record, write_cube

OTHER = "128D_09016_110500"


def test_chan_merge_is_exact_and_stable():
    rng = np.random.default_rng(0)
    values = 2.4e6 + rng.normal(0, 3.0, size=30_000)  # large mean, small spread: naive sums fail
    parts = [Moments.of(chunk) for chunk in np.array_split(values, 7)]
    merged = merge_partials([{"v": p} for p in parts])["v"]
    reversed_ = merge_partials([{"v": p} for p in parts[::-1]])["v"]
    assert merged.count == values.size
    assert merged.mean == pytest.approx(values.mean(), rel=1e-13)
    assert merged.std == pytest.approx(values.std(), rel=1e-9)
    assert reversed_.std == pytest.approx(merged.std, rel=1e-12)
    assert Moments.of(np.array([np.nan, 1.0, 3.0])) == Moments(2, 2.0, 2.0)  # NaNs ignored
    assert Moments().merge(Moments.of(np.ones(3))) == Moments(3, 1.0, 0.0)


def write_dataset(root) -> dict:
    """Two frames; train groups read below, plus a val group that must not count."""
    groups = {
        FRAME: {"20190101": ["20190113", "20190206"], "20190113": ["20190125"]},
        OTHER: {"20190113": ["20190125", "20190206"], "20190701": ["20190713"]},
    }
    records, timeseries, uid = {}, {}, 1
    for frame, frame_groups in groups.items():
        timeseries[frame] = {}
        for primary, secondaries in frame_groups.items():
            ids = []
            for secondary in secondaries:
                records[str(uid)] = record(uid, primary, secondary, False, frame=frame)
                ids.append(uid)
                uid += 1
            timeseries[frame][primary] = {"length": len(ids), "secondary_date": secondaries, "uniqueID": ids}
    (root / "annotations.json").write_text(json.dumps(records))
    (root / "quality_timeseries.json").write_text(json.dumps(timeseries))
    write_cube(str(root), FRAME)
    other = cube_dataset()
    for name in other.data_vars:
        if name != schema.MASK_VAR:
            other[name] = other[name] * 3 - 7  # a different distribution per frame
    write_cube(str(root), OTHER, dataset=other)
    return groups


def expected_statistics(root, groups) -> dict:
    import xarray as xr

    values = {k: [] for k in schema.GEOMORPHOLOGY + schema.ATMOSPHERIC}
    for frame, frame_groups in groups.items():
        ds = xr.open_zarr(str(root / f"{frame}.zarr"), consolidated=False)
        for primary, secondaries in frame_groups.items():
            if primary > "20190531":
                continue
            for secondary in secondaries:
                pair = ds.sel({schema.PRIMARY_DIM: pd.Timestamp(primary), schema.SECONDARY_DIM: pd.Timestamp(secondary)})
                for channel in schema.ALL_CHANNELS:
                    values[schema.statistics_key(channel)].append(pair[channel].values.astype(np.float64).ravel())
    return {k: (np.concatenate(v).mean(), np.concatenate(v).std()) for k, v in values.items()}


def test_compute_statistics_with_ray_tasks(tmp_path, ray_cluster):
    groups = write_dataset(tmp_path)
    cfg = DataConfig(root=str(tmp_path), length=2)
    stats = compute_statistics(cfg, local_locations(cfg), split="train")
    written = local(str(tmp_path / "statistics.json")).read_json()
    assert list(written) == list(schema.GEOMORPHOLOGY + schema.ATMOSPHERIC) and written == stats
    for name, (mean, std) in expected_statistics(tmp_path, groups).items():
        assert stats[name]["mean"] == pytest.approx(mean, rel=1e-12), name
        assert stats[name]["std"] == pytest.approx(std, rel=1e-9), name
    # Written where asked; a split whose interferograms are missing from the cube fails clearly.
    out = tmp_path / "elsewhere" / "stats.json"
    assert compute_statistics(cfg, local_locations(cfg), split="train", out=str(out)) == stats
    assert json.loads(out.read_text()) == stats
    with pytest.raises(DataError, match=r"128D_09016_110500.*20190701"):
        compute_statistics(cfg, local_locations(cfg), split="val", out=str(out))
