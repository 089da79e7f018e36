"""Connecting without a broker: a port that refuses, one that never answers, and a thread
with no event loop."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Iterator


def refused_port() -> int:
    """A local port where nothing listens (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A local port that accepts connections (the kernel completes the handshake) and never
    says a word: a broker that hangs before the AMQP handshake."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def in_thread(target: Any) -> Any:
    """Run ``target()`` in a fresh thread, which has no event loop; return what it returns."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", target()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the thread did not finish"
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value
