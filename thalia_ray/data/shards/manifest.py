"""The manifest of an export: `{out}/{T}/manifest.json`, every shard's samples and byte ranges.

The manifest records, for every sample, the byte range of its members inside the tar, its label and
its position in the sample index, so an epoch's draw reads exactly its samples.
"""
from __future__ import annotations

from typing import Any

from thalia_ray.data.shards.tar import ShardEntry, ShardError
from thalia_ray.storage import Location


MANIFEST = "manifest.json"
FORMAT = "thalia-ray-shards/1"


def shard_root(root: Location, length: int) -> Location:
    """The folder of an export for series length `length`: `{root}/{T}`."""
    return root.join(str(length))


def load_manifest(root: Location, length: int) -> dict[str, Any]:
    loc = shard_root(root, length).join(MANIFEST)
    if not loc.exists():
        raise ShardError(f"{loc.url}: no shard manifest; run `export` for T={length} first")
    manifest = loc.read_json()
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{loc.url}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def manifest_entries(manifest: dict[str, Any], base: Location, split: str) -> list[ShardEntry]:
    """The split's samples from a manifest, in sample-index order."""
    entries = [
        ShardEntry(key, base.join(shard["name"]), offset, size, label, order, shard["sha256"])
        for shard in manifest["shards"]
        if shard["split"] == split
        for key, offset, size, label, order in shard["entries"]
    ]
    return sorted(entries, key=lambda e: e.order)
