"""Ctrl-C and SIGTERM end a command cleanly: the work stops at its next safe point, and says how to go on.

A signal is a request, not an exception in the middle of a write. The CLI installs `handling()` for
every command; work that can stop by itself claims the request (`Stop.graceful`): a training run's
workers leave at their next step (an epoch in progress is abandoned, one being validated or
checkpointed is finished) and return normally, so that Ray Train registers every checkpoint that was
written before the run ends; a sweep's trials do the same, then Tune saves its state; `predict` and
`export` finish the units in flight and write no others. The run is marked `interrupted` with the
reason as soon as the request arrives, and the command ends with one line saying how to resume, exit
status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A second signal stops at once.
Without a claim (a command that cannot stop by itself) the first signal stops at once.

Ray Train and Tune install SIGINT handlers of their own when they run in the main thread, which abort
the run between Ray Train's polls and lose checkpoints reported since the last one: `Stop.run_aside`
runs them in a helper thread instead, where they leave signals alone.

Workers see the request through `RemoteStop`, a small actor this process creates once Ray is up.
`SIGNAL_AT_ENV` is a fault hook for tests and drills: the training loop sends the signal itself at a
named point (see `SignalAt`), and waits until the request has reached the flag, so the point at which
it is seen is deterministic.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime
from typing import Any, Callable, Iterator, TypeVar

from thalia_ray.errors import ThaliaError
from thalia_ray.threads import background

log = logging.getLogger(__name__)
T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_AT_ENV = "THALIA_SIGNAL_AT"  # "SIGNAL:point:n", e.g. "SIGINT:after-checkpoint:2" (see SignalAt)
POLL_S = 0.5  # how often a worker looks at the remote flag


class Interrupted(ThaliaError):
    """The command stopped on a signal; its exit status is 128 + the signal's number, as a shell's is."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Stop:
    """This process's stop request: set by a signal (or `request`), read by the work that can stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self.at: float | None = None
        self.pid = os.getpid()
        self.signal_at = SignalAt.from_env()  # the fault hook, read where the signals are handled
        self._claims: list[str] = []  # what stops by itself at its next safe point (innermost last)
        self._remote: RemoteStop | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------- the request
    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, signum: int) -> None:
        if not self._event.is_set():
            self.signum, self.at = signum, time.time()
            self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def requested_signal(self) -> str | None:
        """The name of the signal that asked to stop, or None."""
        return signal_name(self.signum) if self.requested and self.signum is not None else None

    @property
    def reason(self) -> str:
        """`SIGINT at 10:03:02`: which signal stopped the work, and when."""
        if self.signum is None or self.at is None:
            return "not stopped"
        return f"{signal_name(self.signum)} at {datetime.fromtimestamp(self.at):%H:%M:%S}"

    # ---------------------------------------------------------------------------- who stops how
    @contextlib.contextmanager
    def graceful(self, what: str) -> Iterator["Stop"]:
        """While inside, a first signal asks `what` to stop at its next safe point instead of raising."""
        self._claims.append(what)
        try:
            yield self
        finally:
            self._claims.remove(what)

    @property
    def claimed_by(self) -> str | None:
        return self._claims[-1] if self._claims else None

    def remote(self) -> "RemoteStop":
        """The flag Ray workers and actors read (needs Ray), created once per process; a thread carries
        this process's request to it."""
        with self._lock:
            if self._remote is None:
                import ray

                actor = ray.remote(num_cpus=0)(StopFlag).remote()
                self._remote = RemoteStop(actor, self.pid, self.signal_at)
                flag = self._remote
                threading.Thread(target=self._forward, args=(flag,), name="thalia-stop", daemon=True).start()
            return self._remote

    def _forward(self, flag: "RemoteStop") -> None:
        self._event.wait()
        with contextlib.suppress(Exception):  # Ray may be shutting down: the workers die with it anyway
            flag.request(signal_name(self.signum or signal.SIGINT))

    def run_aside(self, fn: Callable[[], T], name: str) -> T:
        """`fn()` in a helper thread when called from the main thread, which keeps handling signals (Ray
        Train and Tune install their own SIGINT handlers only in the main thread). A second signal raises
        Interrupted here while `fn` goes on in its daemon thread until the process ends."""
        if threading.current_thread() is not threading.main_thread():
            return fn()
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = err

        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)  # signal handlers run between the waits
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def watch(self, callback: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
        """While inside, `callback(reason)` runs once in a helper thread as soon as a stop is requested."""
        return _watching(self.wait, lambda: self.reason, callback)


def interrupted(message: str, stop: "Stop | RemoteStop") -> Interrupted:
    """An Interrupted for `stop`'s signal (SIGINT when unknown)."""
    name = stop.requested_signal()
    return Interrupted(message, int(signal.Signals[name]) if name else signal.SIGINT)


class StopFlag:
    """The Ray actor behind RemoteStop: the signal's name once a stop is requested, and how many Tune
    trials are still running a fit (a sweep ends once none is)."""

    def __init__(self) -> None:
        self.signame: str | None = None
        self.active = 0

    def request(self, signame: str) -> None:
        self.signame = self.signame or signame

    def requested(self) -> str | None:
        return self.signame

    def enter(self) -> str | None:
        self.active += 1
        return self.signame

    def leave(self) -> None:
        self.active -= 1

    def running(self) -> int:
        return self.active


@dataclasses.dataclass(frozen=True)
class RemoteStop:
    """A picklable handle on the stop flag of the process that handles the signals (`pid`), with its fault
    hook (workers do not see that process's environment)."""

    actor: Any
    pid: int
    signal_at: "SignalAt | None" = None

    def request(self, signame: str) -> None:
        import ray

        ray.get(self.actor.request.remote(signame), timeout=30)

    def requested_signal(self) -> str | None:
        return self.requested()

    def graceful(self, what: str) -> contextlib.AbstractContextManager[Any]:
        """Nothing to claim: the process holding the signals claimed its sweep or run already."""
        return contextlib.nullcontext(self)

    def run_aside(self, fn: Callable[[], T], name: str) -> T:
        return fn()  # not the signal-handling process: Ray's handlers stay out anyway

    def remote(self) -> "RemoteStop":
        return self

    def enter(self) -> str | None:
        """A Tune trial starts a fit: counted until `leave`; returns the signal's name if a stop is requested."""
        import ray

        return ray.get(self.actor.enter.remote(), timeout=30)

    def leave(self) -> None:
        import ray

        ray.get(self.actor.leave.remote(), timeout=30)

    def running(self) -> int:
        """How many Tune trials are in a fit."""
        import ray

        return int(ray.get(self.actor.running.remote(), timeout=30))

    def requested(self) -> str | None:
        """The signal's name once a stop is requested, else None (also when the flag is gone)."""
        import ray

        try:
            return ray.get(self.actor.requested.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the driver that owns the flag has gone: nothing to stop for
            return None

    def seen(self) -> threading.Event:
        """An event set by a helper thread, polling every POLL_S, once a stop is requested."""
        event = threading.Event()

        def poll() -> None:
            while not event.is_set():
                if self.requested():
                    event.set()
                    return
                time.sleep(POLL_S)

        threading.Thread(target=poll, name="thalia-stop-poll", daemon=True).start()
        return event

    def watch(self, callback: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
        """As Stop.watch, for a process that only holds the handle (a Tune trial's driver)."""
        state: dict[str, str] = {}

        def wait(timeout: float | None) -> bool:
            state["signame"] = self.requested() or ""
            if not state["signame"] and timeout:
                time.sleep(min(timeout, POLL_S))
            return bool(state["signame"])

        return _watching(wait, lambda: state.get("signame") or "a stop request", callback)


def _watching(wait: Callable[[float | None], bool], reason: Callable[[], str],
              callback: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
    def run(done: threading.Event) -> None:
        while not done.is_set():
            if wait(POLL_S):
                if not done.is_set():
                    callback(reason())
                return

    return background(run, "thalia-stop-watch")


# ------------------------------------------------------------------------------- fault hook
@dataclasses.dataclass(frozen=True)
class SignalAt:
    """`THALIA_SIGNAL_AT=SIGNAL:point:n`: the training loop's rank 0 (or predict and export, for their
    points) sends SIGNAL to the process that handles signals at `point` of epoch (or unit) `n`, once:

    - `during-epoch`: after the epoch's first training step;
    - `before-checkpoint`: after validation, before the epoch's history and checkpoint are written;
    - `during-checkpoint`: after the checkpoint files are written, before Ray Train has them;
    - `after-checkpoint`: once Ray Train has taken the checkpoint;
    - `after-unit`: after `predict` wrote its n-th unit, or `export` recorded its n-th shard.
    """

    signum: int
    point: str
    n: int

    POINTS = ("during-epoch", "before-checkpoint", "during-checkpoint", "after-checkpoint", "after-unit")

    @classmethod
    def parse(cls, spec: str | None) -> "SignalAt | None":
        if not spec:
            return None
        name, point, n = spec.split(":")
        if point not in cls.POINTS:
            raise ValueError(f"{SIGNAL_AT_ENV}={spec}: point {point!r} is not one of {cls.POINTS}")
        return cls(int(signal.Signals[name]), point, int(n))

    @classmethod
    def from_env(cls) -> "SignalAt | None":
        return cls.parse(os.environ.get(SIGNAL_AT_ENV))

    def fire(self, point: str, n: int, stop: "Stop | RemoteStop") -> bool:
        """At `point` of `n`, if it is this hook's: send the signal and wait until `stop` has the request
        (so that the next check sees it); True when it fired."""
        if (point, n) != (self.point, self.n):
            return False
        if stop.requested_signal():
            return False
        log.warning("fault hook: %s at %s %d", signal_name(self.signum), point, n)
        os.kill(stop.pid, self.signum)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if stop.requested_signal():
                return True
            time.sleep(0.05)
        raise RuntimeError(f"fault hook: the stop request of pid {stop.pid} did not arrive within 60 s")


# ------------------------------------------------------------------------------- this process
_STOPS = [Stop()]  # the innermost `handling()`'s request last; the first is never set by a signal


def current() -> Stop:
    """This process's stop request: the one `handling()` installed, else one that no signal sets."""
    return _STOPS[-1]


def _on_signal(signum: int, frame: Any) -> None:
    stop = current()
    what = stop.claimed_by
    if stop.requested or what is None:
        stop.request(signum)
        raise Interrupted(f"interrupted by {signal_name(signum)}" + (f": {what} stopped at once" if what else ""),
                          signum)
    stop.request(signum)
    print(f"thalia-ray: {signal_name(signum)}: {what} stops at its next safe point; send it again to stop at once",
          file=sys.stderr, flush=True)


@contextlib.contextmanager
def handling() -> Iterator[Stop]:
    """SIGINT and SIGTERM handled as the module docstring says, with a fresh stop request, for the duration
    (main thread only: elsewhere Python cannot install handlers, and `current()` stays as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield current()
        return
    _STOPS.append(Stop())
    previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    try:
        yield _STOPS[-1]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _STOPS.pop()


def reclaim_signals() -> None:
    """Put the handlers of an active `handling()` back after a library replaced them: starting Ray installs
    its core worker's own SIGTERM handler in the driver, which dumps a stack and aborts the process."""
    if len(_STOPS) > 1 and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_signal)
