"""The client's pending calls (internal; :class:`~crew.Client` uses it).

A pending call waits in a table, by correlation id, for the one outcome that ends it: a
reply, a dead letter from ``crew.expired``, a call the broker returned (no queue for the
task), its deadline timer, or the loss of the connection. The table never removes a call:
the caller that made it does, however it ends, so none leaks. A call is a :class:`Call`
(a future on the loop, a deadline timer) or, sent by a :class:`crew.SyncClient` caller's
own thread, a :class:`ThreadCall` (a lock that thread waits on, up to the deadline). A
reply for no pending call (late, duplicate, forged) is dropped with one log line.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pika.spec import Basic, BasicProperties

from . import codec, protocol, validation
from .exceptions import (CallError, CodecError, ConnectionLostError, CrewError, DecodeError,
                         DeliveryLimitError, ExpirationError, RemoteError, TimeoutError,
                         UnknownTaskError)

__all__ = ["OFF_LOOP_BYTES", "Call", "Messages", "Outcome", "Pending", "Resend", "ThreadCall",
           "dead_letter_error", "deadline_error", "encode", "encode_now", "outcome"]

# The client's logger: these lines are the client's.
log = logging.getLogger("crew.client")

#: gzip bodies from this size up are compressed and inflated in a thread, off the loop:
#: zlib takes about 2.5 ms for 256 KiB of text here, a thread hop about 0.1 ms.
OFF_LOOP_BYTES = 256 * 1024
#: AMQP reply code of a mandatory message that no queue took.
_NO_ROUTE = 312
#: Task names a client remembers as valid; beyond that they are checked on every call.
_MAX_REMEMBERED_NAMES = 1024

Outcome = tuple[Any, dict[str, Any]]


class Resend(Exception):
    """Settles a ``retry=True`` call whose connection was lost: send it again."""


@dataclass(slots=True, eq=False)
class Call:
    """One call awaiting its outcome."""

    task: str
    future: asyncio.Future[Outcome]
    deadline_ms: int
    retry: bool = False
    reply_to: str = ""  # the reply queue it was last sent with
    timer: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)

    def settle(self, outcome: Outcome | BaseException) -> None:
        """End the call with ``outcome`` (a result or an error), unless it has ended."""
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


class ThreadCall:
    """One call awaited by a thread rather than a future (:mod:`crew.synccall`): settled on
    the loop, which releases the lock the thread waits on. Never a ``retry`` call."""

    __slots__ = ("task", "deadline_ms", "reply_to", "started", "outcome", "_ended")
    retry = False

    def __init__(self, task: str, deadline_ms: int) -> None:
        self.task, self.deadline_ms, self.reply_to = task, deadline_ms, ""
        self.started = time.monotonic()
        self.outcome: Outcome | BaseException | None = None
        self._ended = threading.Lock()
        self._ended.acquire()

    def settle(self, outcome: Outcome | BaseException) -> None:
        """End the call with ``outcome``, unless it has ended (on the loop only)."""
        if self.outcome is None:
            self.outcome = outcome
            self._ended.release()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the outcome; whether it came."""
        return self._ended.acquire(timeout=max(0.0, timeout)) or self.outcome is not None


class Messages:
    """How one client's calls become messages, for :meth:`crew.Client.call` and a
    :class:`crew.SyncClient` caller's own thread (:mod:`crew.synccall`) alike: the checks
    of a call's arguments (:meth:`check`), then its properties (:meth:`properties`).
    Correlation ids are a random prefix per client and a counter: unique, and cheaper than
    a uuid4 per call. Safe from any thread (the counter is ``itertools.count``)."""

    __slots__ = ("_prefix", "_numbers", "_names")

    def __init__(self) -> None:
        self._prefix = f"{uuid.uuid4().hex[:16]}."
        self._numbers = itertools.count(1)
        self._names: set[str] = set()

    def check(self, task: str, priority: int, expiration: float,
              headers: dict[str, Any] | None) -> tuple[float, dict[str, Any]]:
        """A call's seconds to its deadline (``expiration``: the call's, else the client's)
        and a copy of its user headers; ValueError or TypeError for a bad argument."""
        if task not in self._names:  # checked once per name, not on every call
            validation.validate_task_name(task)
            if len(self._names) < _MAX_REMEMBERED_NAMES:  # names may come from HTTP
                self._names.add(task)
        validation.validate_priority(priority)
        return validation.validate_expiration(expiration), validation.validate_user_headers(headers)

    def properties(self, task: str, seconds: float, headers: dict[str, Any],
                   content_type: str, encoding: str | None, *, priority: int,
                   persistent: bool, gzip: bool | None) -> BasicProperties:
        """The properties of a call of ``task`` due in ``seconds``, with a new correlation
        id; ``headers`` (:meth:`check`'s) gain crew's, its deadline among them (epoch ms,
        ``headers[protocol.DEADLINE_HEADER]``). The reply queue is set when it is sent."""
        headers[protocol.DEADLINE_HEADER] = protocol.now_ms() + protocol.seconds_to_ms(seconds)
        headers[protocol.TASK_HEADER] = task
        if gzip is not None:  # the worker compresses the reply as the caller chose
            headers[protocol.GZIP_HEADER] = bool(gzip)
        return BasicProperties(
            content_type=content_type, content_encoding=encoding,
            correlation_id=f"{self._prefix}{next(self._numbers)}", priority=priority,
            headers=headers, delivery_mode=2 if persistent else 1)


class Pending:
    """The table of pending calls, by correlation id, and what settles them."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: dict[str, Call | ThreadCall] = {}

    def on_deadline(self, correlation_id: str, blocked: bool) -> None:
        """A call's deadline (and grace) passed: answer it with :class:`~crew.TimeoutError`;
        ``blocked``: the broker blocks publishers now."""
        call = self.calls.get(correlation_id)
        if call is not None:
            call.settle(deadline_error(call.task, call.started, blocked))

    def on_return(self, _ch: Any, method: Basic.Return, props: BasicProperties,
                  _body: bytes) -> None:
        """A call the broker returned: no queue for its task, or another refusal."""
        call = self.calls.get(props.correlation_id or "")
        if call is None:
            return
        if method.reply_code == _NO_ROUTE:
            call.settle(UnknownTaskError(call.task))
        else:
            call.settle(CallError(f"the broker returned the call to {call.task!r}: "
                                  f"{method.reply_code} {method.reply_text}"))

    def on_reply(self, exchange: str, props: BasicProperties, body: bytes) -> None:
        """A reply or a dead letter on the reply queue: settle the call it answers."""
        call = self.calls.get(props.correlation_id or "")
        if call is None:
            log.info("message %r on the reply queue matches no pending call (late, duplicate "
                     "or forged); dropped", props.correlation_id)
            return
        if exchange == protocol.EXPIRED_EXCHANGE:
            call.settle(dead_letter_error(call.task, props.headers))
            return
        if props.content_encoding == protocol.GZIP and len(body) >= OFF_LOOP_BYTES:
            # Inflating megabytes would hold up every other coroutine on this loop; zlib
            # lets them run meanwhile in a thread.
            try:
                decoding = asyncio.get_running_loop().run_in_executor(
                    None, outcome, props, body)
            except RuntimeError:  # the loop's executor is shut down: inflate here
                pass
            else:
                decoding.add_done_callback(functools.partial(_settle_decoded, call))
                return
        call.settle(outcome(props, body))

    def connection_lost(self) -> None:
        """The replies to every pending call were lost with the old reply queue: a
        ``retry`` call is sent again, any other fails with ConnectionLostError."""
        for call in list(self.calls.values()):
            call.settle(Resend() if call.retry else ConnectionLostError(
                f"the broker connection was lost while the call to {call.task!r} waited; "
                "it may or may not have run"))

    def fail_all(self, error: BaseException) -> None:
        """End every pending call with ``error``."""
        for call in list(self.calls.values()):
            call.settle(error)


def deadline_error(task: str, started: float, blocked: bool) -> TimeoutError:
    """What a call to ``task`` made at ``started`` (monotonic) raises when nothing answered
    it by its deadline and grace; ``blocked``: the broker blocks publishers now."""
    why = ("; the broker is blocking publishers (memory or disk alarm)" if blocked
           else "; it may or may not have run")
    return TimeoutError(f"no answer from task {task!r} by its deadline "
                        f"({time.monotonic() - started:.3f} s after the call){why}")


def dead_letter_error(task: str, headers: dict[str, Any] | None) -> CallError:
    """The error a dead letter of a call to ``task`` means, by its ``x-death`` reason: a
    quorum queue's delivery limit, else (``expired``, or anything else) expiry."""
    if protocol.dead_letter(headers)[0] == protocol.DELIVERY_LIMIT_REASON:
        return DeliveryLimitError(task, protocol.DELIVERY_LIMIT + 1)
    return ExpirationError(f"no worker took the call to {task!r} before its deadline")


def _settle_decoded(call: Call | ThreadCall, decoding: asyncio.Future[Any]) -> None:
    if not decoding.cancelled():
        # outcome() returns crew's errors; anything it raised is a bug, but still an answer.
        call.settle(decoding.exception() or decoding.result())


async def encode(data: Any, content_type: str, gzip: bool | None) -> tuple[bytes, str | None]:
    """:func:`crew.codec.encode`, compressing a large body in a thread: on the loop, a
    megabyte of text would hold up every other coroutine for about 10 ms."""
    body = codec.serialize(data, content_type)
    if not codec.should_gzip(body, gzip) or len(body) < OFF_LOOP_BYTES:
        return _finish(body, gzip)
    return await asyncio.to_thread(codec.gzip_body, body), protocol.GZIP


def encode_now(data: Any, content_type: str, gzip: bool | None) -> tuple[bytes, str | None]:
    """:func:`encode` in the calling thread (a caller's own, not the loop)."""
    return _finish(codec.serialize(data, content_type), gzip)


def _finish(body: bytes, gzip: bool | None) -> tuple[bytes, str | None]:
    if not codec.should_gzip(body, gzip):
        return codec.check_wire_size(body), None
    return codec.gzip_body(body), protocol.GZIP


def outcome(props: BasicProperties, body: bytes) -> Outcome | CrewError:
    """The result or the error a reply carries."""
    headers = props.headers or {}
    status = headers.get(protocol.STATUS_HEADER)
    try:
        value = codec.decode(body, props.content_type, props.content_encoding)
    except CodecError as exc:
        return exc
    if status == protocol.STATUS_OK:
        return value, protocol.user_headers(headers)
    kind, message, traceback = codec.parse_error_envelope(value)
    if status == protocol.STATUS_ERROR:
        return RemoteError(kind, message, traceback)
    if status == protocol.STATUS_TIMEOUT:
        return TimeoutError(message or "the job ran past its deadline and was interrupted",
                            killed=True)
    if status == protocol.STATUS_EXPIRED:
        return ExpirationError(message or "no worker started the call before its deadline")
    return DecodeError(f"reply with unknown status {status!r}")
