"""Progress for long commands: bars (synth, export, prepare stats, sweeps), drawn only on a terminal, and
the one line each training epoch gets.

Off a terminal (logs, pipes, `--json` output read by programs, Ray workers) nothing is drawn, so
captured output stays clean. Bars go to stderr, never into a command's stdout.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from thalia_ray.metric_names import F1, LOSS, TRAIN, VAL, key


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, disabled (a no-op with the same methods) off a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not on_terminal(), leave=False,
                dynamic_ncols=True)


def gather(refs: Sequence[Any], desc: str, unit: str = "task") -> list[Any]:
    """`ray.get(refs)` in the order given, advancing a bar as each result arrives."""
    import ray

    pending = list(refs)
    with bar(len(pending), desc, unit) as progress:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            progress.update(len(ready))
    return ray.get(list(refs))


def progress_line(metrics: Mapping[str, float], epochs: int, improved: bool) -> str:
    """An epoch in one line (rank 0 logs it; a sweep's driver prints it after its trial's label)."""
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}  train loss {metrics[key(TRAIN, LOSS)]:.4f}  "
        f"val loss {metrics[key(VAL, LOSS)]:.4f}  val F1(def) {metrics.get(key(VAL, F1), float('nan')):.3f}  "
        f"{metrics['time/epoch_s']:.1f}s  {metrics['time/samples_per_s']:.1f} samples/s{'  *' if improved else ''}"
    )
