"""Execution callbacks that fit Ray Data 2.60's scheduler to this pipeline's concurrent executions.

The pipeline runs several executions at once: the train split's two lanes (the next epoch starts while
the current one streams) and validation. Two things in Ray Data's executor waste cores there, each fixed
by a callback (Ray Data calls `before_execution_starts` once, `on_execution_step` after every step of its
scheduling loop); measured on a 2-core machine in BENCHMARKS.md ("Waiting executions sleep", "Each
execution sees the whole cluster").

`IdleBackoff`: Ray Data's streaming executor waits for its running tasks in `ray.wait` (up to 0.1 s a
step). With no task running it has nothing to wait on, and its scheduling loop goes round at once, again
and again, on a whole core. That is this pipeline's usual state for one execution at a time: the next
epoch's lane, read ahead as far as its share of the object store allows, waits for its consumer; an
epoch read to its end waits for its last blocks to be taken. Each split coordinator (the actor that runs
an execution for Ray Train's workers) kept a third of a core busy; sleeping instead cut that by 60 %.
After a step that took no time the callback sleeps briefly, so a waiting execution wakes about every
10 ms instead of thousands of times a second. A step that waited in `ray.wait` for a task is never
delayed; one that found a task already done is, by at most `IDLE_SLEEP_S`, which the consumer's
prefetched batches absorb.

`ClusterLimits`: an execution's CPU limit is the smaller of its own `resource_limits` and what Ray
Data's autoscaling coordinator has reserved for it. The coordinator splits the cluster's CPUs between
the executions running at once with integer division and answers asynchronously, so on 2 CPUs each lane
got 1 CPU (one reader idle whenever the other lane had read ahead as far as it may), three executions
got 0 each (one task at a time, by Ray Data's liveness rule), and every execution began at 0 for its
first second. The pipeline already sizes each dataset's `resource_limits` to the CPUs it may use
(`pipeline.DataBudget`), so the callback makes the cluster's current resources (from the GCS, refreshed
every second as Ray Data refreshes its limits) the other bound, as Ray Data did before the coordinator.
Concurrent executions then share the cores through Ray's own scheduler (a task waits for a free CPU), and
how far each reads ahead stays bounded by its share of the object store. Ray Data's requests to scale a
cluster up are unchanged.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from thalia_ray.ray_internals import ExecutionCallback, cluster_resources, set_total_resources

SPIN_S = 0.002  # a scheduling step shorter than this did not wait for a task
IDLE_SLEEP_S = 0.01  # how long a step that did not wait is followed by a pause

__all__ = ["IDLE_SLEEP_S", "SPIN_S", "ClusterLimits", "IdleBackoff", "cluster_resources"]


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


class ClusterLimits(ExecutionCallback):
    """Bounds an execution's limits by the cluster's resources rather than by the autoscaling
    coordinator's share of them (see the module docstring)."""

    def before_execution_starts(self, executor: Any) -> None:
        # The pipeline's tests check that a running execution's limits come from here.
        set_total_resources(executor, cluster_resources)
