"""A synchronous call sent from its caller's own thread (internal; :class:`crew.SyncClient`
uses it).

Handing each call to the loop thread and back costs two thread wake-ups. When it can,
:func:`call_now` does the loop's part in the caller's thread instead, as a worker's job
thread sends its own reply (:mod:`crew.transport`): it validates and encodes the call,
enters it in the client's table of pending calls (a :class:`~crew.pending.ThreadCall`, which
the loop settles as it settles any call), publishes it under the connection's send lock,
and waits on a lock until the loop settles it or its deadline and grace pass. Only the
reply crosses threads.

Only a lone call takes this path. While other calls are pending (many threads calling at
once), the loop sends the calls handed to it together, one system call and one wake-up of
the broker for many, as :meth:`crew.link.Link.send` does: 64 threads each sending their
own call cost more client and worker CPU per call than the hops saved (docs/BENCHMARKS.md).

:func:`call_now` returns :data:`ON_LOOP` (nothing sent) whenever the loop must make the
call as :meth:`crew.Client.call` does: other calls pending, ``retry`` calls (the loop sends
them again after a lost connection), no connection, a broker blocking publishers, a
connection that cannot send from a thread (pika's public path, TLS), or a connection lost
or replaced before the send. Every outcome is :meth:`crew.Client.call`'s: the same
validation, encoding, errors and deadline message, the same table, replies, returns, dead
letters and lost connections.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pika.spec import BasicProperties

from . import protocol
from .client import Client
from .pending import ThreadCall, deadline_error, encode_now

__all__ = ["ON_LOOP", "call_now"]

#: What :func:`call_now` returns when the loop must make the call.
ON_LOOP: Any = object()


def call_now(client: Client, loop: asyncio.AbstractEventLoop, task: str, data: Any,
             options: dict[str, Any]) -> Any:
    """Make the call from this thread and wait for its outcome (``options`` are
    :meth:`crew.Client.call`'s, ``expiration`` given); :data:`ON_LOOP` if it cannot.
    ``loop`` runs ``client``: it sends the cancel notice of an interrupted wait."""
    channel = None if options["retry"] else client.channel_now()
    if channel is None:
        return ON_LOOP
    seconds, properties, body = _message(client, task, data, options)
    call = ThreadCall(task, properties.headers[protocol.DEADLINE_HEADER])
    observer = client.observer  # metrics and traces, as Client.call records them
    span = None if observer is None else observer.start(task, properties.correlation_id,
                                                         properties.headers)
    try:
        outcome = _send_and_wait(client, loop, channel, call, seconds, properties, body)
    except BaseException as exc:
        if observer is not None:
            observer.ended(task, call.started, exc, span)
        raise
    if outcome is ON_LOOP:
        return ON_LOOP  # its span, never ended, is never exported: the loop's call has one
    if observer is not None:
        observer.ended(task, call.started, outcome if isinstance(outcome, BaseException)
                       else None, span)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome if options["return_headers"] else outcome[0]


def _send_and_wait(client: Client, loop: asyncio.AbstractEventLoop, channel: Any,
                   call: ThreadCall, seconds: float, properties: BasicProperties,
                   body: bytes) -> Any:
    """Send the call on ``channel`` from this thread and wait for its outcome (a result or
    an exception); :data:`ON_LOOP`, nothing sent, if the connection changed meanwhile."""
    def prepare() -> BasicProperties | None:
        """Under the send lock: the call addressed to the current reply queue, if it is
        still the connection's that the call was entered for (else the loop sends it)."""
        return properties if client.address(channel, call, properties) else None

    correlation_id = properties.correlation_id
    table = client.pending.calls
    table[correlation_id] = call  # before the send: the reply may come before it returns
    try:
        try:
            sent = channel.publish_now("", protocol.task_queue(call.task), body, prepare,
                                       mandatory=True)
        except Exception:  # noqa: BLE001 - what pika cannot encode: the loop's path raises it
            sent = False
        if not sent:
            return ON_LOOP
        return _wait(client, loop, correlation_id, call, seconds)
    finally:
        table.pop(correlation_id, None)


def _message(client: Client, task: str, data: Any, options: dict[str, Any]
             ) -> tuple[float, BasicProperties, bytes]:
    """The call's seconds to its deadline, properties and body, as :meth:`crew.Client.call`
    makes them (and raises what it raises); the reply queue is set when it is sent."""
    expiration, messages = options["expiration"], client.messages
    seconds, headers = messages.check(
        task, options["priority"], client.expiration if expiration is None else expiration,
        options["headers"])
    body, encoding = encode_now(data, client.content_type, options["gzip"])
    properties = messages.properties(
        task, seconds, headers, client.content_type, encoding, priority=options["priority"],
        persistent=options["persistent"], gzip=options["gzip"])
    return seconds, properties, body


def _wait(client: Client, loop: asyncio.AbstractEventLoop, correlation_id: str,
          call: ThreadCall, seconds: float) -> Any:
    """The call's outcome (a result or an exception), or its TimeoutError once its deadline
    and grace have passed, as the client's deadline timer would have answered."""
    table = client.pending.calls
    try:
        call.wait(call.started + seconds + client.deadline_grace - time.monotonic())
    except BaseException:  # a KeyboardInterrupt, say: cancelled, as Client's would be
        table.pop(correlation_id, None)
        if call.outcome is None:
            try:
                loop.call_soon_threadsafe(client.send_cancel, correlation_id, call)
            except RuntimeError:
                pass  # the loop is closed, and the connection with it
        raise
    table.pop(correlation_id, None)  # from now on, a late reply is dropped
    if call.outcome is None:
        return deadline_error(call.task, call.started, client.blocked)
    return call.outcome
