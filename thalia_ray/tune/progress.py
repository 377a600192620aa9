"""What a sweep shows while it runs: one line per trial epoch, labelled with its trial, in the order
Tune receives them, and on a terminal a bar over every trial's epochs (trials done, running, stopped,
failed; the best value so far).

The sweep driver prints these itself from Tune's results (a Tune `Callback`), so its trials' workers
print no epoch lines: Ray forwards worker output late and folds lines that differ only in numbers
(`[repeated 3x across cluster]`), which merged the epoch lines of different trials. A trial stores each
epoch before it reports it, so a scheduler's stop can end a trial whose last stored epoch Tune never
delivered: when a trial ends, its lines are completed from the store's history.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

from ray.tune import Callback

from thalia_ray import progress
from thalia_ray.progress import progress_line
from thalia_ray.storage import StorageError
from thalia_ray.store import ExperimentStore
from thalia_ray.store.records import StoreError


def trial_label(trial_id: str, config: Mapping[str, Any], varied: Sequence[str]) -> str:
    """`trial 6709d_00003 mobilenetv3_small lr=0.0003`: Tune's trial id and the values it varies."""
    values = []
    for path in varied:
        value = config.get(path)
        name = path.rsplit(".", 1)[-1]
        values.append(str(value) if name == "name" else f"{name}={value:g}" if isinstance(value, float)
                      else f"{name}={value}")
    return " ".join([f"trial {trial_id}", *values])


class SweepProgress(Callback):
    """Tune callback run by the sweep driver; see the module docstring. Picklable (Tune saves it with
    the sweep's state): the bar and the counts are made again in the process that runs the sweep."""

    def __init__(self, metric: str, mode: str, epochs: int, varied: Sequence[str],
                 store: ExperimentStore | None = None, sweep_id: str = "") -> None:
        self.metric, self.mode, self.epochs, self.varied = metric, mode, epochs, list(varied)
        self.store, self.sweep_id = store, sweep_id  # where the trials' histories are (None: Tune's results only)
        self._reset()

    def _reset(self) -> None:
        self.bar: Any = None
        self.outcome: dict[str, str] = {}  # trial id → running, finished, stopped, failed
        self.trial_best: dict[str, float] = {}
        self.best: tuple[float, str] | None = None  # value, trial id
        self.last_epoch: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "epochs": self.epochs, "varied": self.varied,
                "store": self.store, "sweep_id": self.sweep_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------------------ Tune's events
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.outcome[trial.trial_id] = "running"
        self._grow(len(trials))
        self._say(f"{self._label(trial)}: started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", 0))
        if epoch <= self.last_epoch.get(trial.trial_id, 0):
            return  # a resumed trial's report of a finished run
        self.last_epoch[trial.trial_id] = epoch
        value = result.get(self.metric)
        improved = isinstance(value, (int, float)) and self._better(float(value), self.trial_best.get(trial.trial_id))
        if improved:
            self.trial_best[trial.trial_id] = float(value)
            if self.best is None or self._better(float(value), self.best[0]):
                self.best = (float(value), trial.trial_id)
        line = progress_line(result, self.epochs, improved) if "train/loss" in result else f"epoch {epoch}"
        self._say(f"{self._label(trial)} | {line}")
        if self.bar is not None:
            self.bar.update(1)
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for row in self._undelivered(trial):
            self.on_trial_result(iteration, trials, trial, row)
        done = self.last_epoch.get(trial.trial_id, 0)
        ended = "finished" if done >= self.epochs else "stopped"
        self.outcome[trial.trial_id] = ended
        self._shrink(self.epochs - done)
        best = self.trial_best.get(trial.trial_id)
        shown = f", best {self.metric} {best:.3f}" if best is not None else ""
        how = "finished" if ended == "finished" else f"stopped after epoch {done} (by the scheduler or early stopping)"
        self._say(f"{self._label(trial)}: {how}{shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.outcome[trial.trial_id] = "failed"
        self._shrink(self.epochs - self.last_epoch.get(trial.trial_id, 0))
        self._say(f"{self._label(trial)}: failed (the sweep summary has its error)")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _undelivered(self, trial: Any) -> list[dict[str, Any]]:
        """The epochs the trial stored after the last result Tune delivered here (none when unreadable)."""
        if self.store is None:
            return []
        try:
            history = self.store.run(f"{self.sweep_id}-{trial.trial_id}").read_history()
        except (StoreError, StorageError):
            return []
        return [row for row in history if int(row.get("epoch", 0)) > self.last_epoch.get(trial.trial_id, 0)]

    # ------------------------------------------------------------------------------ display
    def _label(self, trial: Any) -> str:
        return trial_label(trial.trial_id, trial.config, self.varied)

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.mode == "max" else value < than)

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _grow(self, trials: int) -> None:
        """A bar (on a terminal) over every known trial's epochs."""
        if self.bar is None and progress.on_terminal():
            self.bar = progress.bar(0, "sweep", unit="epoch")
        if self.bar is not None:
            expected = trials * self.epochs - sum(self.epochs - self.last_epoch.get(t, 0)
                                                  for t, o in self.outcome.items() if o in ("stopped", "failed"))
            self.bar.total = max(self.bar.total or 0, expected)
        self._refresh()

    def _shrink(self, epochs: int) -> None:
        """A trial that ends early never runs its remaining epochs: the bar stops waiting for them."""
        if self.bar is not None and epochs > 0:
            self.bar.total = max(self.bar.n, (self.bar.total or 0) - epochs)
        self._refresh()

    def status(self) -> str:
        counts = {state: sum(1 for o in self.outcome.values() if o == state)
                  for state in ("finished", "running", "stopped", "failed")}
        parts = [f"{n} {state}" for state, n in counts.items() if n]
        if self.best is not None:
            parts.append(f"best {self.metric} {self.best[0]:.3f} ({self.best[1]})")
        return ", ".join(parts)

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(), refresh=True)
