"""Connecting until it works: backoff delays, retries, and the stop that ends them (internal).

:func:`connect_retrying` runs a connection attempt (one of :class:`crew.amqp.Connection`'s
opens, or more) until it succeeds, with jittered, doubling delays between tries; clients,
workers and the cancel stream use it. A 404 on declaring a durable queue whose node is
down or starting is made retryable by :func:`unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from .exceptions import AuthenticationError, BrokerError, ConnectionLostError

log = logging.getLogger(__name__)

T = TypeVar("T")


def backoff(first: float = 0.25, cap: float = 15.0) -> Iterator[float]:
    """Delays before reconnection attempts: doubling from ``first`` up to ``cap``, each
    jittered down by up to half, so that many clients do not reconnect in step."""
    delay = first
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(cap, delay * 2)


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
