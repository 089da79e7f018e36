"""Task functions that several tests serve."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


def failing(_data: Any) -> None:
    """Raises ZeroDivisionError; its traceback shows ``1 / 0``."""
    return 1 / 0  # type: ignore[return-value]


def napping(stopped: threading.Event) -> Callable[[Any], None]:
    """A task that runs until interrupted (it checks often), and sets ``stopped`` then."""
    def nap(_data: Any) -> None:
        try:
            while True:
                time.sleep(0.02)
        finally:
            stopped.set()
    return nap


def holding(started: threading.Event, release: threading.Event) -> Callable[[Any], Any]:
    """A task that sets ``started``, waits up to 20 s for ``release``, and returns its
    argument: a call kept pending for as long as a test needs."""
    def hold(data: Any) -> Any:
        started.set()
        release.wait(20)
        return data
    return hold
