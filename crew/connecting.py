"""Connecting until it works: backoff delays, retries, and the stop that ends them (internal).

:func:`connect_retrying` runs a connection attempt (one of :class:`crew.amqp.Connection`'s
opens, or more) until it succeeds, with jittered, doubling delays between tries; clients,
workers and the cancel stream use it. A 404 on declaring a durable queue whose node is
down or starting is made retryable by :func:`unavailable`. :class:`Nodes` says which node of
a cluster each attempt goes to.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from .exceptions import AuthenticationError, BrokerError, ConnectionLostError
from .settings import BrokerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


def backoff(first: float = 0.25, cap: float = 15.0) -> Iterator[float]:
    """Delays before reconnection attempts: doubling from ``first`` up to ``cap``, each
    jittered down by up to half, so that many clients do not reconnect in step."""
    delay = first
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


class Nodes:
    """The nodes of ``broker`` in turn: each connection attempt takes the next one.

    The first attempt goes to a node chosen at random (``start`` chooses it instead), so
    that many clients and workers given the same URLs spread over the cluster instead of
    all piling onto the first node; then round robin, so that after a lost connection the
    first attempt goes to the next node, not back to the one that was just lost. With one
    node every attempt goes to it, as with a single URL.
    """

    def __init__(self, broker: BrokerSettings, start: int | None = None) -> None:
        self.broker = broker
        count = len(broker.nodes)
        self._next = random.randrange(count) if start is None else start % count

    def next(self) -> BrokerSettings:
        """The settings of the node the next attempt goes to."""
        node = self.broker.node(self._next)
        self._next = (self._next + 1) % len(self.broker.nodes)
        return node


#: AMQP reply code of a declare whose durable queue lives on a node that is down or still
#: starting (after a restart, streams and quorum queues come back after the listener).
NOT_FOUND = 404


def unavailable(error: BrokerError, what: str) -> ConnectionLostError:
    """The retryable error for a 404 on declaring ``what``: its node is down or starting."""
    return ConnectionLostError(f"{what} is not available yet: {error.text}")


class Stopped(Exception):
    """A stop was requested while connecting."""


async def connect_retrying(attempt: Callable[[], Awaitable[T]], *, who: str,
                           timeout: float | None = None, retry_auth: bool = False,
                           stop: asyncio.Event | None = None) -> T:
    """Run ``attempt`` until it connects, waiting :func:`backoff` delays between tries.

    Retries :class:`ConnectionLostError`; :class:`AuthenticationError` too if
    ``retry_auth`` (a reconnection: the credentials worked before and may be fixed again),
    else it is raised at once. ``timeout`` bounds the whole (the last try starts no later
    than it), after which the last error is raised; a set ``stop`` raises :class:`Stopped`.
    """
    loop = asyncio.get_running_loop()
    give_up = None if timeout is None else loop.time() + timeout
    for number, delay in enumerate(backoff(), 1):
        try:
            return await attempt()
        except AuthenticationError as exc:
            if not retry_auth:
                raise
            error: ConnectionLostError = exc
        except ConnectionLostError as exc:
            error = exc
        if give_up is not None:
            remaining = give_up - loop.time()
            if remaining <= 0:
                raise error
            delay = min(delay, remaining)
        log.warning("%s cannot connect (attempt %d): %s; retrying in %.1f s", who, number,
                    error, delay)
        if stop is None:
            await asyncio.sleep(delay)
        elif await sleep_unless(stop, delay):
            raise Stopped(f"{who} was stopped before it could connect")
    raise AssertionError("unreachable: backoff() never ends")


async def sleep_unless(event: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``event`` is set; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        return False
    return True
