"""WebDataset shards, one module per responsibility:

- `tar`: where a sample lives (ShardEntry), tar writing, member parsing, ranged fetches;
- `npy`: our own members (`.npy` arrays + JSON meta, no pickles), encode and decode;
- `published`: the published `torch.save` format (safe loading, decoding, listing, writing);
- `manifest`: an export's manifest (samples, byte ranges, labels, index order);
- `export`: cubes → shards as Ray tasks, resumable;
"""
