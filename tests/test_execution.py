"""The pause that keeps a waiting Ray Data execution's scheduling loop off the CPU."""
from __future__ import annotations

from thalia_ray.data.execution import IDLE_SLEEP_S, SPIN_S, IdleBackoff


class Clock:
    """A clock that advances only when slept on or told to."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_steps_that_did_not_wait_are_followed_by_a_pause_and_waiting_steps_are_not():
    clock = Clock()
    backoff = IdleBackoff(clock, clock.sleep)
    backoff.on_execution_step(None)  # the first step: nothing to compare with
    assert clock.slept == []
    clock.now += SPIN_S / 4  # a step that found nothing to wait for
    backoff.on_execution_step(None)
    assert clock.slept == [IDLE_SLEEP_S]
    for _ in range(3):  # an idle execution keeps pausing, step after step
        clock.now += SPIN_S / 4
        backoff.on_execution_step(None)
    assert clock.slept == [IDLE_SLEEP_S] * 4
    clock.now += 0.1  # a step that waited in ray.wait for a task
    backoff.on_execution_step(None)
    assert clock.slept == [IDLE_SLEEP_S] * 4
