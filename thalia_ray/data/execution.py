"""Keeps a waiting Ray Data execution from spinning on a core.

Ray Data's streaming executor waits for its running tasks in `ray.wait` (up to 0.1 s a step). With
no task running it has nothing to wait on, and its scheduling loop goes round at once, again and
again, on a whole core. That is this pipeline's usual state for one execution at a time: the next
epoch's lane, read ahead as far as its share of the object store allows, waits for its consumer;
an epoch read to its end waits for its last blocks to be taken. Measured on a 2-core machine: each
split coordinator (the actor that runs an execution for Ray Train's workers) kept a third of a
core busy; sleeping instead cut that by 60 % (BENCHMARKS.md, "Waiting executions sleep").

`IdleBackoff` is an execution callback (Ray Data calls it after every step of the loop): after a
step that took no time, it sleeps briefly, so a waiting execution wakes about every 10 ms
instead of thousands of times a second. A step that waited in `ray.wait` for a task is never
delayed; one that found a task already done is, by at most `IDLE_SLEEP_S`, which the consumer's
prefetched batches absorb.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from ray.data._internal.execution.execution_callback import ExecutionCallback

SPIN_S = 0.002  # a scheduling step shorter than this did not wait for a task
IDLE_SLEEP_S = 0.01  # how long a step that did not wait is followed by a pause

__all__ = ["IDLE_SLEEP_S", "SPIN_S", "IdleBackoff"]


class IdleBackoff(ExecutionCallback):
    """Sleeps `IDLE_SLEEP_S` after each scheduling step shorter than `SPIN_S` (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._last: float | None = None

    def on_execution_step(self, executor: Any) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < SPIN_S:
            self._sleep(IDLE_SLEEP_S)
            now = self._clock()
        self._last = now
