"""Checks before Ray: what they refuse is covered through the CLI in test_cli_errors.py; here, how a
sweep's search space relaxes them."""
from __future__ import annotations

import pytest

from thalia_ray import preflight
from thalia_ray.config import load_config
from thalia_ray.errors import ConfigProblem, DataProblem
from thalia_ray.models.pretrained import PretrainedWeightsError


def test_a_sweep_leaves_checks_on_what_it_varies_to_its_trials(tmp_path, synthetic_root):
    """A base batch size too large for the data is no error when the sweep varies the batch size."""
    cfg = load_config(None, [f"data.root={synthetic_root}", f"storage.store={tmp_path}/runs", "train.batch_size=4096"])
    with pytest.raises(ConfigProblem, match="train.batch_size=4096"):
        preflight.for_training(cfg)
    preflight.for_training(cfg, varied=("train.batch_size",))
    with pytest.raises(DataProblem, match="data.root"):
        preflight.for_training(cfg.with_overrides({"data.root": str(tmp_path / "nothing")}), varied=("data.crop",))


def test_evaluation_and_sweeps_check_statistics_and_pretrained_weights(tmp_path, synthetic_root):
    """`evaluate` re-reads a split normalised: missing statistics are refused before Ray; a sweep that
    varies `model.pretrained` leaves its base value to the trials."""
    cfg = load_config(None, [f"data.root={synthetic_root}", f"storage.store={tmp_path}/runs", "train.batch_size=2"])
    preflight.for_evaluation(cfg, "test")
    with pytest.raises(DataProblem, match="data.statistics /nope.json"):
        preflight.for_evaluation(cfg.with_overrides({"data.statistics": "/nope.json"}), "test")
    preflight.for_evaluation(cfg.with_overrides({"data.statistics": "/nope.json", "data.normalize": False}), "test")
    ghost = cfg.with_overrides({"model.pretrained": "run:ghost"})
    with pytest.raises(PretrainedWeightsError, match="run:ghost"):
        preflight.for_training(ghost)
    preflight.for_training(ghost, varied=("model.pretrained",))


def test_a_data_root_on_an_unreachable_or_refusing_endpoint_is_not_called_a_missing_bucket(
        strict_s3_endpoint, s3_env):
    """s3fs answers a lookup of a bare bucket with False for any failure; the root is looked up first."""
    from thalia_ray.config import StorageConfig
    from thalia_ray.storage import S3Options, StorageError

    with pytest.raises(StorageError, match="access denied"):  # wrong credentials for this endpoint
        preflight.location_present("s3://private/thalia", "data.root",
                                   S3Options.of(StorageConfig(endpoint_url=strict_s3_endpoint)))
    closed = S3Options.of(StorageConfig(endpoint_url="http://127.0.0.1:1", timeout_s=10))
    with pytest.raises(StorageError, match="unreachable"):
        preflight.location_present("s3://present/thalia", "data.root", closed)


def test_a_missing_bucket_and_a_missing_prefix_are_told_apart(s3_bucket):
    from thalia_ray.storage import S3Options, StorageError

    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        preflight.location_present("s3://no-such-bucket/thalia", "data.root", S3Options.from_environment())
    with pytest.raises(DataProblem, match="data.root .*/absent: no such folder or object"):
        preflight.location_present(f"{s3_bucket}/absent", "data.root", S3Options.from_environment())


def _without_chunks(root, copy):
    """A copy of `root` whose first cube lost its insar_difference chunks: an all-NaN array, whose chunks
    Zarr never writes."""
    import shutil

    shutil.copytree(root, copy)
    cube = sorted(copy.glob("*.zarr"))[0]
    shutil.rmtree(cube / "insar_difference" / "c")
    return cube


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_cube_variable_without_any_chunk_is_refused_naming_the_cube(tmp_path, synthetic_root, request, where):
    from tests.helpers import upload_folder

    cube = _without_chunks(synthetic_root, tmp_path / "nan")
    root = str(tmp_path / "nan")
    if where == "s3":
        root = f"{request.getfixturevalue('s3_bucket')}/nan"
        upload_folder(tmp_path / "nan", root)
    cfg = load_config(None, [f"data.root={root}", "train.batch_size=2"])
    with pytest.raises(DataProblem, match=rf"cube .*{cube.name}: variable\(s\) \['insar_difference'\] hold no data at all"):
        preflight.cube_pools(cfg, preflight.SPLITS)


def test_a_sparse_cube_variable_passes(tmp_path, synthetic_root):
    """A cube may lack some pairs (the grid is sparse): with the chunks of the pair each frame is probed at
    gone (its first sample's, in index order) but others there, the cubes pass."""
    import shutil

    from thalia_ray.data.cube import CubeCache

    shutil.copytree(synthetic_root, tmp_path / "sparse")
    cfg = load_config(None, [f"data.root={tmp_path / 'sparse'}", "train.batch_size=2"])
    index = preflight.sample_index(cfg)
    probed: dict = {}
    for sample in (s for split in preflight.SPLITS for s in index.samples(split)):
        probed.setdefault(sample.frame_id, sample)
    for frame, sample in probed.items():
        p, (s,) = CubeCache(str(tmp_path / "sparse")).get(frame).positions(sample.primary_date, sample.secondary_dates[:1])
        chunks = tmp_path / "sparse" / f"{frame}.zarr" / "insar_difference" / "c"
        shutil.rmtree(chunks / str(p) / str(s))
        assert any(path.is_file() for path in chunks.rglob("*"))  # other pairs remain
    assert set(preflight.cube_pools(cfg, preflight.SPLITS)) == set(preflight.SPLITS)
