"""Is there something to learn? Train a small CNN on generated interferograms (pure torch, CPU) and
measure how well it separates deformation from none, per intensity level, on held-out dates.

Run: `python -m thalia_ray.data.synthetic.learnability` (a few minutes on 2 cores). Sampled mode:
frames of 128 px at the real 100 m spacing, so footprints span as many pixels as on the real data;
64-px crops as in CPU training. Pairs are generated in memory with the same code that writes the
cubes; train on the train split, test on val + test.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from thalia_ray.data import schema
from thalia_ray.data.synthetic.catalogue import sample_plan, split_of
from thalia_ray.data.synthetic.generator import iter_frame
from thalia_ray.data.synthetic.scene import build_scene, rng_for

CROP = 64


def _crop(fields: dict, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(3, CROP, CROP) cos φ, sin φ (continuous across the wrap) and coherence; centred on the
    deformation (± CROP/4) or at random, as the benchmark crops."""
    size = mask.shape[0]
    if mask.any():
        rows, cols = np.nonzero(mask)
        centre = np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2]) + rng.uniform(-16, 16, 2)
    else:
        centre = rng.uniform(CROP / 2, size - CROP / 2, 2)
    r0, c0 = (np.clip(centre - CROP / 2, 0, size - CROP)).astype(int)
    window = (slice(r0, r0 + CROP), slice(c0, c0 + CROP))
    phase = fields["insar_difference"][window]
    return np.stack([np.cos(phase), np.sin(phase), fields["insar_coherence"][window] / 255.0])


def make_samples(frames: int, size: int, groups: int, seed: int) -> dict[str, np.ndarray]:
    """Crops, labels, splits and the strongest intensity of every generated pair."""
    order = {"None": 0, "Low": 1, "Medium": 2, "High": 3}
    xs, ys, test, level = [], [], [], []
    rng = rng_for(seed, "learnability")
    for index in range(frames):
        plan = sample_plan(rng_for(seed, "plan", index), index, size, groups)
        scene = build_scene(plan.frame_id, size, seed, plan.records, plan.pixel_m)
        for record, fields in iter_frame(scene, plan.records):
            xs.append(_crop(fields, fields[schema.MASK_VAR] > 0, rng))
            ys.append(int(record["label"] != [schema.NEGATIVE_LABEL]))
            test.append(split_of(record["primary_date"]) != "train")
            level.append(max((order.get(v, 2) for v in record["intensity_level"]), default=0))
    return {"x": np.stack(xs).astype(np.float32), "y": np.array(ys), "test": np.array(test), "level": np.array(level)}


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return float(greater)


def run(frames: int = 6, size: int = 128, groups: int = 30, epochs: int = 25, seed: int = 0) -> dict:
    """Generate `frames` sampled frames of `size` px, train the small CNN, report held-out separation."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    data = make_samples(frames, size, groups, seed)
    generated = time.perf_counter() - start
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    train, test = ~data["test"], data["test"]
    model = small_cnn()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(train & (data["y"] == 1)), np.flatnonzero(train & (data["y"] == 0))
    for _ in range(epochs):  # balanced epochs: every positive and as many random negatives
        epoch = rng.permutation(np.concatenate([positives, rng.choice(negatives, len(positives), replace=False)]))
        model.train()
        for batch in np.array_split(epoch, max(1, len(epoch) // 16)):
            flip = [3] if rng.random() < 0.5 else []
            inputs = x[batch].flip(flip) if flip else x[batch]
            loss = nn.functional.cross_entropy(model(inputs), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        scores = torch.softmax(model(x[test]), 1)[:, 1].numpy()
    labels, levels = data["y"][test], data["level"][test]
    # recall per intensity at the threshold that flags 10 % of the negatives (calibration-free)
    threshold = float(np.quantile(scores[labels == 0], 0.9))
    flagged = scores > threshold
    recall = {name: float(flagged[(labels == 1) & (levels == k)].mean())
              for name, k in (("Low", 1), ("Medium", 2), ("High", 3)) if ((labels == 1) & (levels == k)).any()}
    return {
        "pairs": int(len(y)), "train": int(train.sum()), "test": int(test.sum()),
        "test_positives": int(labels.sum()), "auroc": round(auroc(scores, labels), 3),
        "balanced_accuracy_at_0.5": round(float(((scores > 0.5)[labels == 1].mean()
                                                 + (scores <= 0.5)[labels == 0].mean()) / 2), 3),
        "recall_by_intensity_at_10pct_fpr": {k: round(v, 3) for k, v in recall.items()},
        "positives_by_intensity": {name: int(((labels == 1) & (levels == k)).sum())
                                   for name, k in (("Low", 1), ("Medium", 2), ("High", 3))},
        "seconds_generating": round(generated, 1), "seconds_total": round(time.perf_counter() - start, 1),
    }


if __name__ == "__main__":
    print(run())
