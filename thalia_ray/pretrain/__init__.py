"""Self-supervised, multi-modal and geo-aware pretraining on every interferogram (docs/pretraining.md).

`geo` (volcano table, positions, day-of-year encoding) and `source` (the pipeline's source of every
series the cubes hold) sit with the data; `augment`, `methods`, `heads` and `model` with the models;
`objective` and `run` plug pretraining into the shared trainer (`thalia-ray pretrain`).
"""
