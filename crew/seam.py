"""Which of :mod:`crew.transport`'s two paths a connection takes, and why (internal).

The fast path reaches into pika's private internals; the public path uses pika's public
API only (see :mod:`crew.transport`). Each connection takes one of them for its whole
life, chosen when it is made, by :func:`choose`:

1. ``CREW_PIKA_PATH=public`` takes the public path; ``fast`` the fast path even on a pika
   not in :data:`FAST_PATH_PIKA`; ``auto`` (the default, also when unset) the fast path on
   the pika versions it was tested with. Any other value raises ``ValueError``.
2. Then a check of behaviour, once per process: crew's codec (:mod:`crew.wire`) must make
   pika's bytes and read pika's frames for a sample call, reply and ack, and the private
   pika methods and attributes the fast path overrides, calls and writes must be there
   and do what it expects (checked by :mod:`crew.transport` on bare objects, no socket).
   A failed check takes the public path, whatever the switch says.

:func:`report` logs the outcome once per process (and again only if it changes): at INFO
when the fast path is taken or the public one is asked for, at WARNING otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import pika
import pika.frame
from pika.spec import Basic, BasicProperties

from . import wire

log = logging.getLogger(__name__)

#: The environment variable that chooses the path: ``auto`` (default), ``fast``, ``public``.
ENV = "CREW_PIKA_PATH"
#: pika versions crew's fast path was tested with (scripts/test-pika-range tests the first
#: and the last in CI; the others were tested by hand when they were added).
FAST_PATH_PIKA = ("1.3.0", "1.3.1", "1.3.2", "1.4.0", "1.4.1", "1.4.2", "1.4.4")
_MODES = ("auto", "fast", "public")


@dataclass(frozen=True)
class Choice:
    """A connection's path: fast or not, and the reason in words, for the log."""

    fast: bool
    reason: str


def requested() -> str:
    """The path :data:`ENV` asks for: ``auto``, ``fast`` or ``public``."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(_MODES)}, not {mode!r}")
    return mode


def choose(internals_problem: Callable[[], str | None]) -> Choice:
    """The path of the next connection. ``internals_problem()`` says what is wrong with the
    pika internals the fast path uses (None: nothing); it is asked only if needed."""
    mode = requested()
    version = getattr(pika, "__version__", "?")
    if mode == "public":
        return Choice(False, f"{ENV}=public")
    if mode == "auto" and version not in FAST_PATH_PIKA:
        return Choice(False, f"pika {version} is not one the fast path was tested with "
                             f"({', '.join(FAST_PATH_PIKA)}); {ENV}=fast forces it")
    problem = codec_problem() or internals_problem()
    if problem is not None:
        return Choice(False, f"the fast path's check failed on pika {version}: {problem}")
    forced = f", forced by {ENV}=fast" if mode == "fast" else ""
    return Choice(True, f"pika {version} passed the fast path's check{forced}")


_reported: list[Choice] = []


def report(choice: Choice) -> None:
    """Log ``choice`` once per process (again only when a later one differs)."""
    if _reported and _reported[-1] == choice:
        return
    _reported.append(choice)
    healthy = choice.fast or choice.reason == f"{ENV}=public"
    log.log(logging.INFO if healthy else logging.WARNING, "crew uses pika's %s path: %s",
            "fast (private)" if choice.fast else "public", choice.reason)


@functools.cache
def codec_problem() -> str | None:
    """What is wrong with crew's codec under this pika, for a sample call, reply and ack
    (None: nothing)."""
    props = BasicProperties(
        content_type="application/msgpack", delivery_mode=2, priority=3, correlation_id="c.1",
        reply_to="amq.gen-x", expiration="1000", timestamp=1_700_000_000,
        headers={"crew-task": "echo", "crew-deadline": 1_764_625_000_123, "n": -5,
                 "b": b"\x00", "t": True, "s": "\u00e9"})
    try:
        pikas = [pika.frame.Method(1, Basic.Publish(exchange="x", routing_key="crew.q",
                                                    mandatory=True)).marshal(),
                 pika.frame.Header(1, 3, props).marshal(), pika.frame.Body(1, b"xyz").marshal()]
        if wire.publish_frames(1, "x", "crew.q", True, props, b"xyz", 131_072) != pikas:
            return "crew.wire's publish frames differ from pika's"
        if wire.ack_frame(1, 9) != pika.frame.Method(1, Basic.Ack(9)).marshal():
            return "crew.wire's ack differs from pika's"
        deliver = pika.frame.Method(1, Basic.Deliver("ctag", 9, True, "x", "q")).marshal()
        for data in (deliver, *pikas[1:]):
            if wire.decode(data, 0, len(data)) != pika.frame.decode_frame(data)[1]:
                return "crew.wire reads a frame differently from pika"
    except Exception as error:  # noqa: BLE001 - any failure is a failed check
        return f"crew.wire failed: {error!r}"
    return None
