"""A helper thread that lives exactly as long as a `with` block (progress polling, stop watching)."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def background(loop: Callable[[threading.Event], None], name: str) -> Iterator[None]:
    """`loop(done)` in a daemon thread while inside; leaving sets `done` and waits for the loop to return,
    so nothing it does outlives the block."""
    done = threading.Event()
    thread = threading.Thread(target=loop, args=(done,), name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
