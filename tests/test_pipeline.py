"""Ray Data pipelines: balanced epochs identical from cubes and shards, disjoint worker splits, two
Ray Train workers streaming shards from S3 (moto server), bad data reported by shard/cube and key."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from thalia_ray.config import ThaliaConfig
from thalia_ray.data import pipeline
from thalia_ray.data.cube import DataError
from thalia_ray.data.execution import ClusterLimits, IdleBackoff
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.shards.export import export_shards
from thalia_ray.data.shards.manifest import load_manifest, manifest_entries, shard_root
from thalia_ray.data.shards.tar import file_sha256
from thalia_ray.ray_internals import add_execution_callbacks
from thalia_ray.storage import local

from tests.helpers import LimitRecorder, build_root, local_locations, upload_folder, write_published

BASE = {"root": "", "crop": 24, "length": 1, "samples_per_read_task": 4, "atmospheric": ["surface_pressure"]}


def config(root: str, **data) -> ThaliaConfig:
    return ThaliaConfig.model_validate({"seed": 3, "data": {**BASE, "root": root, **data}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_cluster) -> tuple[str, str]:
    """(dataset root, shard root with T=1 exported)."""
    base = tmp_path_factory.mktemp("pipeline")
    root = build_root(base / "root")
    export_shards(config(root).data, local_locations(config(root).data), str(base / "shards"), length=1, samples_per_shard=4)
    return root, str(base / "shards")


def keys(ds) -> list[str]:
    return [str(k) for batch in ds.iter_batches(batch_size=None, batch_format="numpy") for k in batch["key"]]


def test_balanced_epochs_identical_from_cubes_and_shards(dataset):
    root, out = dataset
    cube = pipeline.build_datasets(config(root), splits=("train", "val"))
    shard = pipeline.build_datasets(config(root, source="shards", shards=out), splits=("train", "val"))
    index = SampleIndex.from_config(config(root).data, 3)
    positives = {s.key for s in index.samples("train") if s.label == 1}
    negatives = {s.key for s in index.samples("train") if s.label == 0}
    assert len(negatives) > len(positives) > 0
    assert cube.sizes == shard.sizes == {"train": 2 * len(positives), "val": len(index.samples("val"))}
    drawn = []
    for epoch in (0, 1):
        pipeline.set_epoch(cube.epoch_control, epoch)
        pipeline.set_epoch(shard.epoch_control, epoch)
        lane = pipeline.lane_name("train", epoch)
        from_cube, from_shards = keys(cube.datasets[lane]), keys(shard.datasets[lane])
        assert sorted(from_cube) == sorted(from_shards) == sorted(k.key for k in index.epoch("train", epoch, 3))
        assert len(set(from_cube)) == len(from_cube) and positives <= set(from_cube)
        assert len(set(from_cube) & negatives) == len(positives)
        drawn.append(set(from_cube) & negatives)
    assert drawn[0] != drawn[1]  # fresh negatives every epoch
    assert keys(cube.datasets["val"]) == keys(shard.datasets["val"]) == [s.key for s in index.samples("val")]
    # val records are equal sample for sample (same crop, normalisation, targets)
    rows = [next(iter(ds.iter_batches(batch_size=100, batch_format="numpy")))
            for ds in (cube.datasets["val"], shard.datasets["val"])]
    for name in ("image", "mask", "label", "aux_activity_type", "confidence"):
        np.testing.assert_array_equal(rows[0][name], rows[1][name])


def test_reference_crops_are_fixed_across_epochs_and_equal_to_an_export(dataset, tmp_path):
    root, _ = dataset
    settings = {"crop": 16, "crop_policy": "reference", "augmentations": False}
    out = str(tmp_path / "reference")
    export_shards(config(root, **settings).data, local_locations(config(root, **settings).data), out, length=1, splits=("val",), samples_per_shard=4, seed=3)
    cube = pipeline.build_datasets(config(root, **settings), splits=("train", "val"))
    shard = pipeline.build_datasets(config(root, source="shards", shards=out, **settings), splits=("val",))
    images = []
    for epoch in (0, 1):
        pipeline.set_epoch(cube.epoch_control, epoch)
        batches = cube.datasets[pipeline.lane_name("train", epoch)].iter_batches(batch_size=None, batch_format="numpy")
        images.append({str(k): image for batch in batches for k, image in zip(batch["key"], batch["image"])})
    common = images[0].keys() & images[1].keys()  # every positive, and the negatives drawn twice
    assert len(common) >= 2
    for key in common:  # the same crop every epoch, as the reference's shards
        np.testing.assert_array_equal(images[0][key], images[1][key])
    rows = [next(iter(ds.iter_batches(batch_size=100, batch_format="numpy")))
            for ds in (cube.datasets["val"], shard.datasets["val"])]
    assert list(rows[0]["key"]) == list(rows[1]["key"])
    np.testing.assert_array_equal(rows[0]["image"], rows[1]["image"])  # the cube path cuts the exported crops


def test_concurrent_lanes_each_may_use_the_data_budget_from_their_first_step(dataset):
    """Ray Data's autoscaling coordinator would give two concurrent executions an integer share of the
    CPUs each, and none until it first answers (this test then sees limits of 0, and of 1 when the budget
    is 2 or more); with ClusterLimits each lane's limit is its budget at every step."""
    root, _ = dataset
    data = pipeline.build_datasets(config(root), splits=("train",))
    budgets = {ds.context.execution_options.resource_limits.cpu for ds in data.datasets.values()}
    assert len(budgets) == 1
    budget = budgets.pop()
    for ds in data.datasets.values():
        add_execution_callbacks(ds.context, LimitRecorder)
    LimitRecorder.seen.clear()
    streams = []
    for epoch in (0, 1):  # the next epoch starts while the first one still streams
        pipeline.set_epoch(data.epoch_control, epoch)
        streams.append(iter(data.datasets[pipeline.lane_name("train", epoch)].iter_batches(batch_size=2)))
        next(streams[-1])
    for stream in streams:
        for _ in stream:
            pass
    assert len(LimitRecorder.seen) == 2
    assert all(steps and set(steps) == {budget} for steps in LimitRecorder.seen.values()), LimitRecorder.seen


@pytest.mark.parametrize("source", ["cube", "shards"])
def test_each_sample_of_an_epoch_reaches_exactly_one_of_two_workers(dataset, source):
    """Two workers stream three epochs as the training loop does: each next epoch starts on the other
    lane while the current one still streams (here after its first batch, the earliest a consumer may)."""
    import threading

    root, out = dataset
    cfg = config(root, source="shards", shards=out) if source == "shards" else config(root)
    data = pipeline.build_datasets(cfg, splits=("train",))
    assert sorted(data.datasets) == ["train", "train-lane1"]
    # a lane's coordinator sleeps between scheduling steps while it waits, and sees the whole cluster
    # (thalia_ray.data.execution)
    assert all({IdleBackoff, ClusterLimits} <= set(ds.context.custom_execution_callback_classes)
               for ds in data.datasets.values())
    parts = {name: ds.streaming_split(2, equal=True) for name, ds in data.datasets.items()}
    epochs = (0, 1, 2)
    got: dict[tuple[int, int], list[str]] = {}
    started: dict[int, list[int]] = {0: [], 1: []}  # per worker: epochs started, in order

    def worker(rank: int) -> None:
        lanes = pipeline.EpochLanes(data.epoch_control, lambda name: parts[name][rank], 3, 1)
        batches = lanes.start(epochs[0])
        started[rank].append(epochs[0])
        for epoch in epochs:
            upcoming, got[rank, epoch] = None, []
            for taken, batch in enumerate(batches, 1):
                if taken == 1 and epoch + 1 in epochs:
                    upcoming = lanes.start(epoch + 1)  # before this epoch's last batches
                    started[rank].append(epoch + 1)
                got[rank, epoch] += batch["key"]
            batches = upcoming

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    index = SampleIndex.from_config(cfg.data, cfg.seed)
    assert started == {0: list(epochs), 1: list(epochs)}
    for epoch in epochs:
        first, second = got[0, epoch], got[1, epoch]
        assert len(first) == len(second) == data.sizes["train"] // 2 > 3
        delivered = first + second
        assert len(set(delivered)) == len(delivered)  # no sample twice, within or across workers
        # a balanced draw is even (as many negatives as positives): nothing is dropped by the equal split
        assert sorted(delivered) == sorted(s.key for s in index.epoch("train", epoch, cfg.seed))
    assert len({frozenset(got[0, e] + got[1, e]) for e in epochs}) == len(epochs)  # a fresh draw every epoch


@pytest.mark.slow
def test_two_train_workers_stream_shards_from_s3(dataset, s3_bucket, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config_: dict) -> None:  # nested: pickled by value, the workers cannot import this module
        import json as json_
        from pathlib import Path as Path_

        import ray.train

        from thalia_ray.data import pipeline as pl

        out = {}
        for epoch in range(2):
            pl.set_epoch(config_["handle"], epoch)
            shard = ray.train.get_dataset_shard(pl.lane_name("train", epoch))
            batches = list(shard.iter_torch_batches(batch_size=2, collate_fn=pl.TorchCollate(), prefetch_batches=1))
            out[epoch] = [k for b in batches for k in b["key"]]
            assert all(b["image"].dtype.is_floating_point and b["image"].shape[1:] == (3, 24, 24) for b in batches)
            assert all(not b["label"].dtype.is_floating_point for b in batches)
        rank = ray.train.get_context().get_world_rank()
        Path_(config_["dir"], f"rank{rank}.json").write_text(json_.dumps(out))

    root, out = dataset
    upload_folder(out, f"{s3_bucket}/shards")
    cfg = config(root, source="shards", shards=f"{s3_bucket}/shards", atmospheric=[])
    data = pipeline.build_datasets(cfg, splits=("train",))
    trainer = TorchTrainer(
        loop,
        train_loop_config={"handle": data.epoch_control, "dir": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(name="pipeline-s3", storage_path=str(tmp_path / "runs"),
                             failure_config=FailureConfig(max_failures=0)),
        datasets=data.datasets,
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    index = SampleIndex.from_config(cfg.data, cfg.seed)
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and len(a) == len(b)
        assert set(a) | set(b) <= {s.key for s in index.epoch("train", int(epoch), cfg.seed)}
        assert len(a) + len(b) == data.sizes["train"] - data.sizes["train"] % 2
    assert set(ranks[0]["0"]) | set(ranks[1]["0"]) != set(ranks[0]["1"]) | set(ranks[1]["1"])


def _corrupt_member(out: str, split: str, position: int) -> tuple[str, str]:
    """Overwrite the npy header of one sample's image member; returns (shard path, key)."""
    base = shard_root(local(out), 1)
    entry = manifest_entries(load_manifest(local(out), 1), base, split)[position]
    path = Path(entry.shard.path)
    data = bytearray(path.read_bytes())
    start = entry.offset + tarfile.BLOCKSIZE
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return str(path), entry.key


def test_tampered_and_corrupt_shards_are_reported_by_name(dataset, tmp_path):
    root, _ = dataset
    out = str(tmp_path / "shards")
    export_shards(config(root).data, local_locations(config(root).data), out, length=1, splits=("val",), samples_per_shard=4)
    path, key = _corrupt_member(out, "val", 1)
    # changed after export: the shard fails its manifest digest, and every sample in it is refused
    base = shard_root(local(out), 1)
    manifest = load_manifest(local(out), 1)
    in_shard = {e.key for e in manifest_entries(manifest, base, "val") if e.shard.path == path}
    tampered = pipeline.build_datasets(config(root, source="shards", shards=out), splits=("val",))
    assert set(keys(tampered.datasets["val"])) == {e.key for e in manifest_entries(manifest, base, "val")} - in_shard
    bad = pipeline.bad_sample_report(tampered.epoch_control)["epochs"]["0"]["samples"]
    assert {b["key"] for b in bad} == in_shard and all("sha256" in b["reason"] for b in bad)
    # written corrupt (the digest in the manifest is the corrupt shard's): only the damaged sample
    for shard in manifest["shards"]:
        if path.endswith(shard["name"]):
            shard["sha256"] = file_sha256(path)
    base.join("manifest.json").write_json(manifest)
    data = pipeline.build_datasets(config(root, source="shards", shards=out), splits=("val",))
    got = keys(data.datasets["val"])
    assert key not in got and len(got) == data.sizes["val"] - 1
    report = pipeline.bad_sample_report(data.epoch_control)
    [bad] = report["epochs"]["0"]["samples"]
    assert bad["origin"].endswith(path.split("/shards/")[1]) and bad["key"] == key and bad["split"] == "val"
    strict = pipeline.build_datasets(config(root, source="shards", shards=out, on_bad_sample="fail"), splits=("val",))
    with pytest.raises(Exception, match=key) as err:
        keys(strict.datasets["val"])
    assert "DataError" in err.typename or isinstance(err.value, DataError) or "DataError" in str(err.value)


def test_skipped_samples_number_train_epochs_from_one_and_list_val_once():
    sample = {"origin": "f.zarr", "key": "f/1", "reason": "DataError: never written"}
    report = {"policy": "skip", "max_bad_samples": 16, "epochs": {
        "0": {"count": 2, "samples": [{"split": "val", **sample}, {"split": "train", **sample}]},
        "2": {"count": 1, "samples": [{"split": "train", **sample, "key": "f/2"}]}}}
    assert [(r["epoch"], r["split"], r["key"]) for r in pipeline.skipped_samples(report)] == [
        (None, "val", "f/1"), (1, "train", "f/1"), (3, "train", "f/2")]
    assert pipeline.skipped_samples({"epochs": {}}) == []


@pytest.mark.parametrize("variable", ["insar_difference", "deformation_mask"])
def test_missing_zarr_chunk_is_reported_and_limit_enforced(tmp_path, ray_cluster, variable):
    root = build_root(tmp_path / "root")
    index = SampleIndex.from_config(config(root).data, 3)
    victim = index.samples("val")[0]
    chunks = sorted(Path(root, f"{victim.frame_id}.zarr", variable, "c").rglob("*"))
    [c.unlink() for c in chunks if c.is_file()]  # every chunk of one variable of one frame
    data = pipeline.build_datasets(config(root), splits=("val",))
    got = keys(data.datasets["val"])
    report = pipeline.bad_sample_report(data.epoch_control)["epochs"]["0"]
    lost = {s.key for s in index.samples("val") if s.frame_id == victim.frame_id}
    assert set(got) == {s.key for s in index.samples("val")} - lost
    assert {b["key"] for b in report["samples"]} == lost and report["count"] == len(lost)
    assert all(b["origin"].endswith(f"{victim.frame_id}.zarr") and variable in b["reason"]
               and "never written" in b["reason"] for b in report["samples"])
    limited = pipeline.build_datasets(config(root, max_bad_samples=1), splits=("val",))
    with pytest.raises(Exception, match="exceed data.max_bad_samples=1"):
        keys(limited.datasets["val"])


def test_published_shards_of_every_split_as_a_source(dataset, tmp_path):
    """Shards in the published layout (written as the reference exporter writes them) are read for
    every split: val/test equal the cube path record for record, train draws balanced epochs from
    train_pos/train_neg with fresh negatives and feeds a training step."""
    import torch

    root, _ = dataset
    out = str(tmp_path / "published")
    cfg = config(root, source="published", shards=out)
    written = {split: write_published(out, cfg.data, split) for split in ("train", "val", "test")}
    assert sorted(p.name for p in Path(out, "1").iterdir()) == ["test", "train_neg", "train_pos", "val"]
    data = pipeline.build_datasets(cfg, splits=("train", "val", "test"))
    cube = pipeline.build_datasets(config(root), splits=("val", "test"))
    for split in ("val", "test"):
        assert keys(data.datasets[split]) == written[split]
        ours, theirs = (next(iter(d.datasets[split].iter_batches(batch_size=100, batch_format="numpy")))
                        for d in (data, cube))
        for name in ("image", "mask", "label", "aux_activity_type", "confidence"):
            np.testing.assert_array_equal(ours[name], theirs[name])
    index = SampleIndex.from_config(config(root).data, 3)
    positives = {key for key, s in zip(written["train"], index.samples("train")) if s.label == 1}
    negatives_drawn = []
    for epoch in (0, 1):
        pipeline.set_epoch(data.epoch_control, epoch)
        labels = {}
        for batch in data.datasets[pipeline.lane_name("train", epoch)].iter_batches(batch_size=None, batch_format="numpy"):
            labels.update(zip(batch["key"], batch["label"]))
        assert len(labels) == data.sizes["train"] == 2 * len(positives) and set(labels) <= set(written["train"])
        assert {k for k, label in labels.items() if label == 1} == positives
        negatives_drawn.append({k for k, label in labels.items() if label == 0})
    assert negatives_drawn[0] != negatives_drawn[1]
    pipeline.set_epoch(data.epoch_control, 2)
    batch = next(iter(data.datasets[pipeline.lane_name("train", 2)].iter_torch_batches(batch_size=4, collate_fn=pipeline.TorchCollate())))
    model = torch.nn.Sequential(torch.nn.Conv2d(batch["image"].shape[1], 2, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_published_shards_train_in_random_mix_epochs(dataset, tmp_path):
    """The presets' shard path: `balance_plan: random_mix` draws each epoch from the train_pos/train_neg
    entries as the reference's RandomMix does (every positive, a varying number of negatives), streams
    exactly that epoch, and sizes the run's step cap by its largest epoch."""
    root, _ = dataset
    out = str(tmp_path / "published")
    cfg = config(root, source="published", shards=out, balance_plan="random_mix")
    cfg = cfg.with_overrides({"train.epochs": 6})
    write_published(out, cfg.data, "train")
    data = pipeline.build_datasets(cfg, splits=("train",))
    source = data.sources["train"]
    epochs = [source.items(epoch) for epoch in range(6)]
    positives = {e.key for e in epochs[0] if e.label == 1}
    assert all({e.key for e in items if e.label == 1} == positives for items in epochs)
    assert len({len(items) for items in epochs}) > 1  # a random number of negatives per epoch
    assert data.sizes["train"] == max(len(items) for items in epochs)
    pipeline.set_epoch(data.epoch_control, 3)
    assert sorted(keys(data.datasets[pipeline.lane_name("train", 3)])) == sorted(e.key for e in epochs[3])


@pytest.mark.parametrize("total, trainers, limit, processes, task_cpus", [
    (2, 1.0, None, 2, 0.5),    # one reader per core, sharing the one CPU the trainer leaves
    (4, 0.0, None, 4, 1.0),    # no trainer (a driver consumes): one reader per core, a whole CPU each
    (2, 1.0, 1, 1, 1.0),       # one busy reader asked for
    (4, 1.0, 0.5, 1, 0.5),     # a cap below one CPU: one reader asking for the cap
    (2, 2.0, None, 2, 0.125),  # trainers hold every CPU: small requests, never none
])
def test_data_budget_never_packs_more_readers_than_asked(total, trainers, limit, processes, task_cpus):
    cfg = ThaliaConfig.model_validate({"data": {"root": "x"}, "runtime": {"data_cpu_limit": limit}})
    budget = pipeline.data_budget(cfg, total, trainers)
    assert (budget.processes, budget.task_cpus) == (processes, task_cpus)
    assert budget.cpus <= max(total - trainers, pipeline.MIN_TASK_CPUS) and budget.cpus <= (limit or total)


def test_read_tasks_stream_model_ready_blocks_of_the_configured_size(dataset):
    """Read, decode and finalize run in the read task, which streams a block every samples_per_block
    samples: no map stage, no split into one-row blocks, no merging of a task's blocks into one."""
    root, out = dataset
    for cfg in (config(root, samples_per_read_task=6, samples_per_block=4),
                config(root, source="shards", shards=out, samples_per_read_task=6, samples_per_block=4)):
        data = pipeline.build_datasets(cfg, splits=("val",))
        ds = data.datasets["val"]
        blocks = [len(b["key"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
        n = data.sizes["val"]
        short = min(2 * data.sources["val"].readers, n)  # two one-sample tasks per reader start the epoch
        tasks = [1] * short + [min(6, n - start) for start in range(short, n, 6)]
        assert sorted(blocks) == sorted(b for t in tasks for b in ([4, t - 4] if t > 4 else [t]))
        assert "MapBatches" not in str(ds) and "image" in ds.schema().names


@pytest.mark.parametrize("samples, readers, explicit, expected", [
    (1118, 2, None, 144),  # about 4 tasks per reader, in whole 16-sample blocks
    (100, 2, None, 13),  # a small epoch: tasks of less than a block, 4 per reader
    (3, 2, None, 1),
    (1118, 2, 50, 50),  # data.samples_per_read_task as given
])
def test_read_task_size(samples, readers, explicit, expected):
    data = config("x", samples_per_read_task=explicit, samples_per_block=16).data
    assert pipeline.task_size(data, samples, readers) == expected


@pytest.mark.parametrize("samples, per_task, per_block, readers", [
    (1118, 192, 64, 2), (10, 3, 64, 2), (7, 7, 2, 1), (0, 4, 4, 2), (1, 4, 4, 2), (20, 8, 16, 3)])
def test_task_bounds_cover_the_epoch_once_starting_with_short_tasks(samples, per_task, per_block, readers):
    bounds = pipeline.task_bounds(samples, per_task, per_block, readers)
    assert [i for start, end in bounds for i in range(start, end)] == list(range(samples))
    assert all(end - start <= per_task for start, end in bounds)
    first = min(per_task, max(1, per_block // 4))
    short = min(2 * readers, -(-samples // first))
    assert [end - start for start, end in bounds[:short]] == [min(first, samples - i * first) for i in range(short)]


def test_train_epochs_alternate_lanes():
    assert [pipeline.lane_name("train", epoch) for epoch in range(4)] == ["train", "train-lane1"] * 2
    assert pipeline.lane_name("val", 1) == "val"  # one execution per validation, one dataset


def test_validation_starts_a_few_seconds_before_training_is_expected_to_end():
    slow = pipeline.EpochLead(steps=100, started=0.0)  # one batch a second
    assert not slow.due(10, now=10.0)  # 90 s left
    assert slow.due(100 - int(pipeline.LEAD_S), now=100.0 - pipeline.LEAD_S)
    assert slow.due(75, now=1e6)  # however slow, with a quarter of the batches left
    fast = pipeline.EpochLead(steps=100, started=0.0)
    assert fast.due(1, now=0.01)  # the whole epoch takes about a second: at once
    assert not fast.due(1, now=0.1)  # 99 batches at 0.1 s: 9.9 s left


def test_each_lane_plans_the_latest_epoch_set_for_it(dataset):
    import ray

    handle = pipeline.build_datasets(config(dataset[0]), splits=("val",)).epoch_control
    lanes = [handle.actor().get_epoch.remote(lane) for lane in (0, 1)]
    assert ray.get(lanes) == [0, 1]  # before any set_epoch: each lane's first epoch
    for epoch in (4, 5, 6):  # epoch 6 starts on lane 0 while lane 1 still streams epoch 5
        pipeline.set_epoch(handle, epoch)
    assert ray.get([handle.actor().get_epoch.remote(lane) for lane in (0, 1)]) == [6, 5]


def test_block_size_limit_passes_each_block_on_whole(dataset):
    """Ray Data holds a task's output until it exceeds the limit and slices blocks over 1.5 × the limit:
    a block of real model-ready records must land between the two."""
    from ray.data.block import BlockAccessor

    root, _ = dataset
    for extra in ({}, {"mask_target": "all", "length": 2}):
        cfg = config(root, samples_per_block=4, **extra)
        data = pipeline.build_datasets(cfg, splits=("train",))
        (_, rows), *_ = data.sources["train"].chunks(0, cfg.data.samples_per_block)
        records = [load() for _, _, load in rows()]
        assert len(records) == 4
        block = BlockAccessor.batch_to_block(pipeline.records_to_batch(records))
        size = BlockAccessor.for_block(block).size_bytes()
        assert pipeline.block_size_limit(cfg.data) < size < 1.5 * pipeline.block_size_limit(cfg.data)


@pytest.mark.timeout(300)
def test_read_tasks_fit_in_what_others_leave(dataset):
    """Datasets built while other work holds most CPUs (another trial, the evaluation task building them)
    still get their read tasks scheduled: the budget leaves those CPUs out."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    root, _ = dataset
    spare = 0.75
    held = ray.cluster_resources()["CPU"] - ray.available_resources()["CPU"]
    holder = Holder.options(num_cpus=ray.cluster_resources()["CPU"] - held - spare).remote()
    try:
        ray.get(holder.ready.remote())
        data = pipeline.build_datasets(config(root), splits=("val",))
        assert len(keys(data.datasets["val"])) == data.sizes["val"]
    finally:
        ray.kill(holder)
