"""WebDataset export and reads: our own shards (read back equal to the cube path, resume, corrupt
members) and the published `torch.save` shards (read safely; unsafe pickles refused)."""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from thalia_ray.config import DataConfig
from thalia_ray.data import schema
from thalia_ray.data.cube import crop_rng, get_cache, read_sample
from thalia_ray.data.index import SampleIndex
from thalia_ray.data.shards.export import PROGRESS, export_shards
from thalia_ray.data.shards.manifest import MANIFEST, load_manifest, manifest_entries, shard_root
from thalia_ray.data.shards.npy import decode_own, member_limit
from thalia_ray.data.shards.published import decode_published, scan_published
from thalia_ray.data.shards.tar import (ShardEntry, ShardError, UnsafeShardError, fetch_ranges, file_sha256,
                                        parse_members, write_tar)
from thalia_ray.storage import S3Options, local, resolve

from tests.helpers import Payload, build_root, local_locations, published_sample, torch_bytes, write_published


def data_config(root: str, **overrides) -> DataConfig:
    return DataConfig.model_validate({"root": root, "crop": 24, "length": 1, "samples_per_read_task": 4,
                                      "atmospheric": ["surface_pressure"], **overrides})


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return build_root(tmp_path_factory.mktemp("thalia-root"))


# ------------------------------------------------------------------------------------- tests
def test_tar_ranges_read_back_members(tmp_path):
    path = str(tmp_path / "a.tar")
    items = [(f"k{i}", {"image.npy": bytes([i]) * (300 + i), "json": b"{}"}) for i in range(3)]
    ranges = write_tar(path, items)
    data = Path(path).read_bytes()
    for (key, members), (rkey, offset, size) in zip(items, ranges):
        assert rkey == key
        assert parse_members(data[offset:offset + size], "t") == {key: members}
    assert write_tar(str(tmp_path / "b.tar"), items) == ranges
    assert file_sha256(path) == file_sha256(str(tmp_path / "b.tar"))  # reproducible bytes


def test_export_reads_back_equal_to_cube_path(root, tmp_path, ray_cluster):
    cfg = data_config(root, length=2)
    report = export_shards(cfg, local_locations(cfg), str(tmp_path / "out"), length=2, samples_per_shard=2)
    assert report.shards_written > 0 and report.shards_kept == 0 and not report.skipped
    base = shard_root(local(str(tmp_path / "out")), 2)
    manifest = json.loads(Path(base.path, MANIFEST).read_text())
    assert manifest["channels"] == cfg.channels  # the configured channels only, as published shards
    index = SampleIndex.from_config(cfg, 0)
    for split in ("train", "val", "test"):
        entries = manifest_entries(manifest, base, split)
        assert [e.key for e in entries] == [s.key for s in index.samples(split)]
    assert {s["name"].split("/")[0] for s in manifest["shards"]} == {"train_pos", "train_neg", "val", "test"}
    for s in manifest["shards"]:
        tar = Path(base.path, s["name"])
        assert file_sha256(str(tar)) == s["sha256"] and tar.stat().st_size == s["bytes"]
        with tarfile.open(tar) as handle:
            names = handle.getnames()
        assert all(n.split(".", 1)[1] in ("image.npy", "mask.npy", "json") for n in names)
        assert all(e[3] == (1 if s["name"].startswith("train_pos") else e[3]) for e in s["entries"])
    # every sample decodes to exactly what the cube path reads (evaluation crop, selected channels)
    cache = get_cache(root)
    entries = manifest_entries(manifest, base, "val") + manifest_entries(manifest, base, "train")
    by_key = {s.key: s for split in ("train", "val") for s in index.samples(split)}
    for entry, blob in fetch_ranges(entries):
        members = parse_members(blob, entry.where)[entry.key]
        assert np.load(io.BytesIO(bytes(members["image.npy"]))).shape[:2] == (2, len(cfg.channels))
        raw = decode_own(members, entry.key, entry.where, cfg.channels, manifest["channels"])
        direct = read_sample(by_key[entry.key], index.annotations, cache, cfg, channels=schema.ALL_CHANNELS)
        picked = [schema.ALL_CHANNELS.index(c) for c in cfg.channels]
        np.testing.assert_array_equal(raw.image, direct.image[:, picked])
        np.testing.assert_array_equal(raw.mask, direct.mask)
        assert raw.meta == json.loads(json.dumps(direct.meta))
        np.testing.assert_array_equal(raw.image, read_sample(by_key[entry.key], index.annotations, cache, cfg).image)


def test_reference_crops_export_equals_cube_path(root, tmp_path, ray_cluster):
    """Under the reference policy every split is exported with each sample's fixed random crop,
    the window the cube path cuts for it (seeded by the run seed and the sample key)."""
    cfg = data_config(root, crop=16, crop_policy="reference")
    out = str(tmp_path / "ref")
    export_shards(cfg, local_locations(cfg), out, length=1, splits=("train", "val"), samples_per_shard=4, seed=333)
    manifest = load_manifest(local(out), 1)
    assert manifest["crop_policy"] == "reference"
    index = SampleIndex.from_config(cfg, 333)
    by_key = {s.key: s for split in ("train", "val") for s in index.samples(split)}
    entries = manifest_entries(manifest, shard_root(local(out), 1), "val")
    entries += manifest_entries(manifest, shard_root(local(out), 1), "train")
    windows = []
    for entry, blob in fetch_ranges(entries):
        raw = decode_own(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, cfg.channels,
                         manifest["channels"])
        sample = by_key[entry.key]
        direct = read_sample(sample, index.annotations, get_cache(root), cfg, crop_rng("reference", 333, sample.key, 5))
        np.testing.assert_array_equal(raw.image, direct.image)
        np.testing.assert_array_equal(raw.mask, direct.mask)
        assert raw.meta["window"] == direct.meta["window"]
        assert (raw.mask.max() > 0) == (sample.label == 1)  # positives keep mask pixels in the crop
        windows.append(tuple(raw.meta["window"]))
    assert len(set(windows)) > 3  # random crops, not one centred window
    # another seed draws other crops: the earlier shards are not kept on resume
    again = export_shards(cfg, local_locations(cfg), out, length=1, splits=("val",), samples_per_shard=4, seed=334)
    assert again.shards_kept == 0 and again.shards_written > 0


def test_export_to_s3_and_float16(root, s3_bucket, ray_cluster):
    cfg = data_config(root)
    out = resolve(f"{s3_bucket}/shards", S3Options.from_environment())
    report = export_shards(cfg, local_locations(cfg), out, length=1, splits=("val",), samples_per_shard=4, dtype="float16", compress=True)
    assert report.samples == {"val": 6} and report.shards_written == 2
    manifest = load_manifest(out, 1)
    entries = manifest_entries(manifest, shard_root(out, 1), "val")
    index = SampleIndex.from_config(cfg, 0)
    for entry, blob in fetch_ranges(entries):
        members = parse_members(blob, entry.where)[entry.key]
        assert set(members) == {"image.npy.gz", "mask.npy.gz", "json"}
        raw = decode_own(members, entry.key, entry.where, cfg.channels, manifest["channels"], compressed=True)
        direct = read_sample(index.samples("val")[entry.order], index.annotations, get_cache(root), cfg)
        np.testing.assert_array_equal(raw.image, direct.image.astype(np.float16).astype(np.float32))


def test_resume_keeps_complete_shards_and_redoes_partial_ones(root, tmp_path, ray_cluster):
    cfg = data_config(root)
    out = str(tmp_path / "out")
    first = export_shards(cfg, local_locations(cfg), out, length=1, splits=("train",), samples_per_shard=5)
    base = Path(out, "1")
    manifest = json.loads((base / MANIFEST).read_text())
    victim, truncated = manifest["shards"][0]["name"], manifest["shards"][1]["name"]
    os.remove(base / PROGRESS / f"{victim}.json")  # interrupted before its completion record
    (base / truncated).write_bytes((base / truncated).read_bytes()[:700])  # a half-written tar under its name
    (base / MANIFEST).unlink()
    second = export_shards(cfg, local_locations(cfg), out, length=1, splits=("train",), samples_per_shard=5)
    assert second.shards_written == 2 and second.shards_kept == first.shards_written - 2
    again = json.loads((base / MANIFEST).read_text())
    assert again["shards"] == manifest["shards"]  # identical bytes and hashes after the resume
    assert not list(base.rglob("*.tmp"))
    # another member layout (all nine channels) reuses nothing: every shard is written again
    third = export_shards(cfg, local_locations(cfg), out, length=1, splits=("train",), samples_per_shard=5, all_channels=True)
    assert third.shards_kept == 0 and third.shards_written == first.shards_written
    assert json.loads((base / MANIFEST).read_text())["channels"] == list(schema.ALL_CHANNELS)
    # a shard changed after export (same size, other bytes) is written again, not kept under its old digest
    tampered = base / victim
    data = bytearray(tampered.read_bytes())
    data[-2000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    fourth = export_shards(cfg, local_locations(cfg), out, length=1, splits=("train",), samples_per_shard=5, all_channels=True)
    assert fourth.shards_written == 1 and fourth.shards_kept == first.shards_written - 1
    [record] = [s for s in json.loads((base / MANIFEST).read_text())["shards"] if s["name"] == victim]
    assert file_sha256(str(tampered)) == record["sha256"] and tampered.read_bytes() != bytes(data)


def test_all_channel_export_serves_any_subset_and_a_missing_channel_is_named(root, tmp_path, ray_cluster):
    from thalia_ray.config import ThaliaConfig
    from thalia_ray.data.pipeline import build_datasets

    cfg = data_config(root)
    full, narrow = str(tmp_path / "full"), str(tmp_path / "narrow")
    export_shards(cfg, local_locations(cfg), full, length=1, splits=("val",), samples_per_shard=4, all_channels=True)
    export_shards(cfg, local_locations(cfg), narrow, length=1, splits=("val",), samples_per_shard=4)
    other_cfg = data_config(root, geomorphology=["insar_coherence"], atmospheric=["total_column_water_vapour"])
    other = other_cfg.channels  # coherence and both water-vapour channels: two are not in cfg.channels
    manifest = load_manifest(local(full), 1)
    index = SampleIndex.from_config(cfg, 0)
    for entry, blob in fetch_ranges(manifest_entries(manifest, shard_root(local(full), 1), "val")):
        raw = decode_own(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, other, manifest["channels"])
        direct = read_sample(index.samples("val")[entry.order], index.annotations, get_cache(root), cfg, channels=other)
        np.testing.assert_array_equal(raw.image, direct.image)
    [(entry, blob)] = list(fetch_ranges(manifest_entries(
        load_manifest(local(narrow), 1), shard_root(local(narrow), 1), "val")[:1]))
    with pytest.raises(ShardError, match=rf"key {entry.key}: channels \['\w+_total_column_water_vapour"):
        decode_own(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, other, cfg.channels)
    run_cfg = ThaliaConfig.model_validate({"data": {**other_cfg.model_dump(), "source": "shards", "shards": narrow}})
    with pytest.raises(ValueError, match="data.geomorphology/data.atmospheric: .*_total_column_water_vapour.*--all-channels"):
        build_datasets(run_cfg, splits=("val",))


def test_member_parsing_matches_tarfile_and_falls_back_for_pax_headers(tmp_path):
    long_key = "k" * 120  # a name over 100 bytes needs a PAX header, which the fast path hands to tarfile
    items = [("a1", {"image.npy": b"x" * 700, "json": b"{}"}), (long_key, {"json": b"[1]"})]
    path = tmp_path / "m.tar"
    (_, _, first_size), _ = write_tar(str(path), items)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        expected = {m.name: tar.extractfile(m).read() for m in tar}
    parsed = parse_members(data, "t")
    assert {f"{k}.{suffix}": bytes(v) for k, ms in parsed.items() for suffix, v in ms.items()} == expected
    plain = parse_members(data[:first_size], "t")  # the first sample alone: plain ustar, zero-copy views
    assert isinstance(plain["a1"]["image.npy"], memoryview) and bytes(plain["a1"]["image.npy"]) == b"x" * 700
    with pytest.raises(ShardError, match="t: member a1.image.npy is truncated"):
        parse_members(data[:900], "t")


def test_corrupt_member_is_named(root, tmp_path, ray_cluster):
    cfg = data_config(root)
    out = str(tmp_path / "out")
    export_shards(cfg, local_locations(cfg), out, length=1, splits=("val",), samples_per_shard=6)
    base = shard_root(local(out), 1)
    entries = manifest_entries(load_manifest(local(out), 1), base, "val")
    tar = Path(base.path, "val", "shard-000000.tar")
    data = bytearray(tar.read_bytes())
    victim = entries[2]
    start = victim.offset + tarfile.BLOCKSIZE  # the image.npy header, right after its tar header
    data[start:start + 16] = b"\xff" * 16
    tar.write_bytes(bytes(data))
    # the shard no longer matches its manifest digest: every sample of it is refused, by shard
    checked = list(fetch_ranges(entries))
    assert len(checked) == len(entries) and all(
        isinstance(err, ShardError) and f"shard {tar.as_posix()}: sha256" in str(err) for _, err in checked)
    # without a digest to check (as for published shards) the damaged member is named by key
    results = {e.key: blob for e, blob in fetch_ranges([dataclasses.replace(e, sha256=None) for e in entries])}
    with pytest.raises(ShardError, match=f"{tar.name}, key {victim.key}"):
        members = parse_members(results[victim.key], victim.where)[victim.key]
        decode_own(members, victim.key, victim.where, cfg.channels)
    short = ShardEntry(victim.key, victim.shard, len(data) - 100, 400, 0, 0)
    [(entry, err)] = list(fetch_ranges([short]))
    assert isinstance(err, ShardError) and victim.key in str(err) and "shard" in str(err)


def test_published_shards_read_and_unsafe_content_refused(root, tmp_path, ray_cluster):
    cfg = data_config(root, length=1)
    out = str(tmp_path / "published")
    keys = write_published(out, cfg, "val", writers=1, malicious_key="evil01")
    with pytest.raises(UnsafeShardError, match=r"sample-val-000001\.tar, key evil01"):
        scan_published(local(out), 1, "val", "union")
    assert not Path("/tmp/thalia-pwned").exists()
    Path(out, "1", "val", "sample-val-000001.tar").unlink()  # the one holding the payload
    entries = scan_published(local(out), 1, "val", "union")
    assert [e.key for e in entries] == keys[:4]
    index = SampleIndex.from_config(cfg, 0)
    for entry, blob in fetch_ranges(entries):
        raw = decode_published(parse_members(blob, entry.where)[entry.key], entry.key, entry.where, cfg, "val")
        direct = read_sample(index.samples("val")[int(entry.key.removeprefix("sample"))], index.annotations,
                             get_cache(root), cfg, channels=schema.ALL_CHANNELS)
        picked = [schema.ALL_CHANNELS.index(c) for c in cfg.channels]
        np.testing.assert_array_equal(raw.image, direct.image[:, picked])
        np.testing.assert_array_equal(raw.mask, np.where(direct.mask == 2, 1, direct.mask))
        assert raw.meta["unique_ids"] == direct.meta["unique_ids"] and raw.meta["label"] == direct.meta["label"]
    evil = published_sample(index, index.samples("val")[0], cfg)
    evil["image.pth"] = torch_bytes(Payload())
    with pytest.raises(UnsafeShardError, match="key evil02, member image.pth"):
        decode_published(evil, "evil02", "shard mem://x.tar, key evil02", cfg, "val")
    assert not Path("/tmp/thalia-pwned").exists()


@pytest.mark.parametrize("compress", [False, True])
def test_export_folders_are_read_by_standard_webdataset_readers(root, tmp_path, ray_cluster, compress):
    import ray
    import webdataset

    cfg = data_config(root)
    out = local(tmp_path / "out")
    export_shards(cfg, local_locations(cfg), out, length=1, samples_per_shard=4, compress=compress)
    base = shard_root(out, 1)
    manifest = load_manifest(out, 1)
    ext = ".npy.gz" if compress else ".npy"
    for folder in ("train_pos", "train_neg", "val", "test"):
        split_dir = Path(base.path, folder)
        assert {p.suffix for p in split_dir.iterdir()} == {".tar"}  # nothing but shards in a split folder
        split = "train" if folder.startswith("train") else folder
        expected = {e.key: e for e in manifest_entries(manifest, base, split) if e.shard.path.startswith(str(split_dir))}
        assert expected and not any("." in key for key in expected)
        ours = {e.key: decode_own(parse_members(blob, e.where)[e.key], e.key, e.where, cfg.channels, manifest["channels"],
                                  compressed=compress)
                for e, blob in fetch_ranges(list(expected.values()))}
        tars = sorted(str(p) for p in split_dir.iterdir())
        seen = {}
        for row in webdataset.WebDataset(tars, shardshuffle=False).decode():  # decodes .npy and .npy.gz
            seen[row["__key__"]] = row
            np.testing.assert_array_equal(row[f"image{ext}"], ours[row["__key__"]].image)
            np.testing.assert_array_equal(row[f"mask{ext}"], ours[row["__key__"]].mask)
            assert row["json"] == ours[row["__key__"]].meta
        assert set(seen) == set(expected)
        rows = ray.data.read_webdataset(str(split_dir)).take_all()
        assert sorted(r["__key__"] for r in rows) == sorted(expected)
        for r in rows:
            image = r[f"image{ext}"]
            if compress:  # Ray hands gzipped members over as bytes
                image = np.load(io.BytesIO(gzip.decompress(image)))
            np.testing.assert_array_equal(image, ours[r["__key__"]].image)
            assert r["json"] == ours[r["__key__"]].meta


def test_gzip_bomb_is_refused_before_inflating_and_compression_must_match_the_manifest():
    import tracemalloc
    import zlib

    from thalia_ray.data.samples import RawSample
    from thalia_ray.data.shards.npy import sample_members

    raw = RawSample(np.ones((1, 2, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8), "k1", {"frame_id": "f"})
    for compress in (False, True):
        members = sample_members(raw, "float32", compress)
        decoded = decode_own(members, "k1", "shard s, key k1", ["a", "b"], ["a", "b"], compressed=compress)
        np.testing.assert_array_equal(decoded.image, raw.image)
        with pytest.raises(ShardError, match=rf"key k1: member image\.npy{'.gz' if compress else ''} found, but the "
                                             rf"manifest says the export is {'un' if compress else ''}compressed"):
            decode_own(members, "k1", "shard s, key k1", ["a", "b"], ["a", "b"], compressed=not compress)
    # a valid header for 32 bytes of data, followed by 256 MiB of zeros: under 1 MiB compressed
    header = io.BytesIO()
    np.save(header, np.zeros(8, np.float32))
    deflate = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    bomb = deflate.compress(header.getvalue()) + b"".join(deflate.compress(bytes(1 << 20)) for _ in range(256))
    bomb += deflate.flush()
    assert len(bomb) < 1 << 20
    members = dict(sample_members(raw, "float32", True), **{"image.npy.gz": bomb})
    tracemalloc.start()
    with pytest.raises(ShardError, match=r"key k1: member image\.npy\.gz inflates beyond the \d+ bytes its .npy header"):
        decode_own(members, "k1", "shard s, key k1", ["a", "b"], ["a", "b"], compressed=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20  # nothing near the 256 MiB the member would inflate to
    # an honest header for 256 MiB (all zeros, under 1 MiB compressed): more than a sample of a T=1,
    # 2-channel, 4² export can hold, so it is refused before anything is inflated past its header
    deflate = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float32)) | {"shape": (1, 2, 8192, 4096)}
    declared = io.BytesIO()
    np.lib.format.write_array_header_1_0(declared, header)
    honest = deflate.compress(declared.getvalue())
    honest += b"".join(deflate.compress(bytes(1 << 20)) for _ in range(256)) + deflate.flush()
    members = dict(sample_members(raw, "float32", True), **{"image.npy.gz": honest})
    limit = member_limit(length=1, channels=2, crop=4)
    tracemalloc.start()
    with pytest.raises(ShardError, match=r"key k1: member image\.npy\.gz declares \d+ bytes, more than a sample of "
                                         r"this export holds \(\d+\); refused before inflating"):
        decode_own(members, "k1", "shard s, key k1", ["a", "b"], ["a", "b"], compressed=True, limit=limit)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20
    assert decode_own(sample_members(raw, "float32", True), "k1", "s", ["a", "b"], ["a", "b"], compressed=True,
                      limit=limit).image.shape == (1, 2, 4, 4)  # a real sample of that export fits the limit
    truncated = sample_members(raw, "float32", True)["image.npy.gz"][:-10]
    with pytest.raises(ShardError, match="image.npy.gz is not valid gzip"):
        decode_own(dict(members, **{"image.npy.gz": truncated}), "k1", "w", ["a"], ["a", "b"], compressed=True)


def test_an_export_serves_only_runs_with_its_padding(root, tmp_path, ray_cluster):
    """Short series hold other members under another padding: a config asking for the reference's
    padding draws is refused on an export padded per group, naming both."""
    from thalia_ray.data.sources import OwnShards

    out = str(tmp_path / "per-group")
    export_shards(data_config(root, length=4), local_locations(data_config(root, length=4)), out, length=4, splits=("val",), samples_per_shard=8)
    assert load_manifest(local(out), 4)["padding"] == "per_group"
    same = data_config(root, length=4, source="shards", shards=out)
    assert OwnShards.open(same, local(out), 0, ("val",)).entries["val"]
    with pytest.raises(ShardError, match="exported with padding='per_group'.*data.padding='reference'"):
        OwnShards.open(data_config(root, length=4, source="shards", shards=out, padding="reference"), local(out), 0,
                       ("val",))


def test_a_signal_ends_export_after_whole_shards_and_the_rerun_keeps_them(root, tmp_path, ray_cluster, monkeypatch):
    import re

    from thalia_ray import interrupts
    from thalia_ray.interrupts import SIGNAL_AT_ENV, Interrupted

    cfg, out = data_config(root), str(tmp_path / "out")
    monkeypatch.setenv(SIGNAL_AT_ENV, "SIGTERM:after-unit:1")
    with interrupts.handling(), pytest.raises(Interrupted) as stopped:
        export_shards(cfg, local_locations(cfg), out, length=1, splits=("train",), samples_per_shard=3, max_in_flight=1)
    counts = re.search(r"interrupted by SIGTERM: (\d+) of (\d+) shards complete \(kept", str(stopped.value))
    assert counts and stopped.value.exit_code == 143, str(stopped.value)
    complete, total = int(counts[1]), int(counts[2])
    assert 1 <= complete < total and not Path(out, "1", MANIFEST).exists()
    monkeypatch.delenv(SIGNAL_AT_ENV)
    report = export_shards(cfg, local_locations(cfg), out, length=1, splits=("train",), samples_per_shard=3, max_in_flight=1)
    assert (report.shards_kept, report.shards_written) == (complete, total - complete)
    assert len(json.loads(Path(out, "1", MANIFEST).read_text())["shards"]) == total
