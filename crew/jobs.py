"""Jobs: one call being served by a worker, from its delivery to its reply (internal).

A :class:`Job` is read from a delivery (checks, deadline), decodes its argument, calls its
task (in a job thread of :mod:`crew.pool`, or on the loop for ``async def`` tasks) and
encodes the :class:`Reply`, whatever the task returned or raised. While it runs,
:data:`current_job` names it: :mod:`crew.context` reads the call's headers and deadline
there, and the :class:`Scope` of the worker serving it (its settings and publisher).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from pika.spec import BasicProperties

from . import codec, protocol
from .exceptions import CodecError, JobKilled
from .registry import Settings
from .threads import Interruptible

if TYPE_CHECKING:
    from .amqp import Channel

log = logging.getLogger(__name__)

#: The job running in this thread or asyncio task, if any: how ``context`` finds its call.
current_job: contextvars.ContextVar[Job | None] = contextvars.ContextVar(
    "crew_current_job", default=None)


class Publishes(Protocol):
    """``context.pubsub``: what publishes to pubsub channels for task code."""

    def publish(self, channel: str, data: Any = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Scope:
    """What task code may see of the worker serving it: ``context.settings`` and
    ``context.pubsub``. One per worker, shared by all its jobs; made by the worker."""

    settings: Settings
    pubsub: Publishes


@dataclass(slots=True)
class Reply:
    """What a finished job sends back: a status, a body and its content encoding."""

    status: str
    body: bytes
    encoding: str | None = None


class Job:
    """One call being served by a worker."""

    __slots__ = ("scope", "task", "func", "delivery_tag", "correlation_id", "reply_to",
                 "content_type", "reply_type", "content_encoding", "body", "headers",
                 "reply_gzip", "deadline", "watch", "answered", "timer", "coroutine", "thread",
                 "channel", "received", "priority", "ttl", "observed", "started", "failure")

    # longer than 40 lines because it sets each slot of the job, with what it means
    def __init__(self, scope: Scope | None, task: str, func: Callable[[Any], Any],
                 delivery_tag: int, correlation_id: str, reply_to: str,
                 content_type: str | None, content_encoding: str | None, body: bytes,
                 headers: dict[str, Any], deadline: float,
                 reply_gzip: bool | None = None, priority: int = 0) -> None:
        #: What the task sees of its worker (None: a job run outside a worker, in tests).
        self.scope = scope
        self.task = task
        self.func = func
        self.delivery_tag = delivery_tag
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        #: The call's content type as sent, which decoding checks.
        self.content_type = content_type
        #: What the reply is written in: the call's type, or msgpack when crew cannot write it.
        self.reply_type = protocol.CONTENT_TYPES.get(content_type or "", protocol.MSGPACK)
        self.content_encoding = content_encoding
        self.body = body
        #: The call's user headers; the task may change them and they go back with the reply.
        self.headers = headers
        #: The caller's gzip choice for the reply (``crew-gzip``); None: compress if it pays.
        self.reply_gzip = reply_gzip
        #: When the job must be over, on the ``time.monotonic()`` clock.
        self.deadline = deadline
        #: The call's priority as its caller sent it (0 when it sent none).
        self.priority = priority
        self.watch = Interruptible()
        #: Set by the loop once a reply went out (or the call was dropped); never twice.
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None
        self.coroutine: asyncio.Task[Any] | None = None
        self.thread: threading.Thread | None = None
        #: The channel it was delivered on: its delivery tag means nothing on another.
        self.channel: Channel | None = None
        #: When the worker read the call, on the ``time.monotonic()`` clock (``crew inspect``).
        self.received = time.monotonic()
        #: The call's AMQP ``expiration`` (its TTL in ms when published), as delivered.
        self.ttl: str | None = None
        #: What :mod:`crew.observing` notes of the job (its start and span), if anything.
        self.observed: Any = None
        #: When the task began, on the ``time.monotonic()`` clock; None until it does.
        self.started: float | None = None
        #: The error envelope of its reply, if it failed (:mod:`crew.figures`).
        self.failure: dict[str, str] | None = None

    @classmethod
    def from_delivery(cls, scope: Scope, task: str, func: Callable[[Any], Any],
                      delivery_tag: int, props: BasicProperties,
                      body: bytes) -> tuple["Job", CodecError | None]:
        """The job for a delivered call, and why it must be refused (or None).

        Its ``reply_to`` and ``correlation_id`` are checked already. Anyone who may publish
        to the vhost chooses these properties: a refusal still yields a job, so the caller
        gets an error reply.
        """
        headers, refusal = props.headers or {}, None
        if not all(isinstance(k, str) for k in headers):  # pika gives non-UTF-8 as bytes
            headers = {k: v for k, v in headers.items() if isinstance(k, str)}
            refusal = CodecError("header names must be UTF-8 text")
        task_header = headers.get(protocol.TASK_HEADER)
        if task_header is not None and task_header != task:
            refusal = CodecError(
                f"call for task {task_header!r:.200} arrived on the queue of {task!r}")
        try:
            deadline = deadline_ms(headers, props.expiration)
        except CodecError as exc:
            refusal, deadline = exc, deadline_ms({}, props.expiration)
        reply_gzip = headers.get(protocol.GZIP_HEADER)
        if reply_gzip is not None and not isinstance(reply_gzip, bool):
            refusal, reply_gzip = CodecError(
                f"header {protocol.GZIP_HEADER} must be a boolean, not "
                f"{type(reply_gzip).__name__}"), None
        job = cls(scope, task, func, delivery_tag, props.correlation_id, props.reply_to,
                  props.content_type, props.content_encoding, body,
                  protocol.user_headers(headers), monotonic_deadline(deadline), reply_gzip,
                  props.priority or 0)
        job.ttl = props.expiration
        return job, refusal

    @property
    def key(self) -> tuple[str, str]:
        return self.reply_to, self.correlation_id

    def error_reply(self, exc: BaseException, *, status: str = protocol.STATUS_ERROR,
                    with_traceback: bool = True) -> Reply:
        envelope = codec.error_envelope(exc, with_traceback)
        if self.failure is None:  # the first is the answer: a kill's, not its thread's late one
            self.failure = envelope
        return self.encode_reply(status, envelope)

    def where(self) -> str:
        """Where the job runs now, as a traceback's lines (most recent call last); "" when
        neither its thread nor its coroutine is running."""
        if self.coroutine is not None:
            frames = [(frame, frame.f_lineno) for frame in self.coroutine.get_stack()]
        else:
            ident = self.thread.ident if self.thread is not None else None
            frame = sys._current_frames().get(ident) if ident is not None else None
            frames = list(traceback.walk_stack(frame))[::-1] if frame is not None else []
        return "".join(traceback.StackSummary.extract(frames).format())

    def killed_reply(self, where: str) -> Reply:
        """The reply to a job interrupted at its deadline. Its failure (:mod:`crew.figures`,
        the dashboard) keeps ``where`` it was (:meth:`where`, just before the kill); the
        caller's reply does not carry it."""
        reply = self.error_reply(JobKilled("the job ran past its deadline"),
                                 status=protocol.STATUS_TIMEOUT, with_traceback=False)
        if self.failure is not None and where:
            self.failure = {**self.failure, "traceback": (
                f"Where the job was at its deadline (most recent call last):\n{where}")}
        return reply

    def expired_reply(self, message: str) -> Reply:
        """The reply to a call whose deadline passed before its job began."""
        self.failure = {"type": "ExpirationError", "message": message, "traceback": ""}
        return self.encode_reply(protocol.STATUS_EXPIRED, self.failure)

    def encode_reply(self, status: str, value: Any) -> Reply:
        """Encode ``value`` in the call's content type; never raises.

        An unencodable result becomes an error reply. An error envelope that cannot be
        encoded as it is (a message with a lone surrogate, or over the size limit) is cut
        down to one that can: the caller gets an answer whatever the task raised.
        """
        try:
            body, encoding = codec.encode(value, self.reply_type, self.reply_gzip)
        except CodecError as exc:
            if status == protocol.STATUS_OK:
                return self.error_reply(exc, with_traceback=False)
            body, encoding = codec.encode(codec.encodable_envelope(value), self.reply_type,
                                          self.reply_gzip)
        return Reply(status, body, encoding)

    def decode_argument(self) -> Any:
        """The call's argument. A body that cannot be read is logged here, once, and the
        :class:`~crew.CodecError` raised for the caller's error reply."""
        try:
            return codec.decode(self.body, self.content_type, self.content_encoding)
        except CodecError as exc:
            log.warning("call %r to %s refused: %s", self.correlation_id, self.task, exc)
            raise

    def run_sync(self) -> Reply:
        """Decode, call the task and encode its result, in the current (job) thread."""
        token = current_job.set(self)
        self.started = time.monotonic()
        try:
            try:
                argument = self.decode_argument()
            except CodecError as exc:
                return self.error_reply(exc, with_traceback=False)
            try:
                result = self.func(argument)
            except JobKilled:
                raise
            except BaseException as exc:  # noqa: BLE001 - the task's own, SystemExit included
                return self.error_reply(exc)
            return self.encode_reply(protocol.STATUS_OK, result)
        finally:
            current_job.reset(token)

    async def run_async(self) -> Reply:
        """Decode, await the coroutine task and encode its result, on the loop."""
        current_job.set(self)  # this asyncio task runs in a context of its own
        self.started = time.monotonic()
        try:
            argument = self.decode_argument()
        except CodecError as exc:
            return self.error_reply(exc, with_traceback=False)
        try:
            result = await self.func(argument)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the task's own failure
            return self.error_reply(exc)
        return self.encode_reply(protocol.STATUS_OK, result)


def monotonic_deadline(deadline_ms: int) -> float:
    """An epoch-milliseconds deadline on this process's monotonic clock."""
    return time.monotonic() + (deadline_ms - protocol.now_ms()) / 1000


def deadline_ms(headers: Mapping[str, Any], expiration: str | None) -> int:
    """The call's deadline: its ``crew-deadline`` header, else now plus its TTL or the
    default expiration; never further away than :data:`~crew.protocol.MAX_EXPIRATION`, so
    no job outlives the broker's consumer timeout.

    A ``crew-deadline`` that is there but not an integer raises :class:`~crew.CodecError`:
    guessing a deadline for a malformed call could run it long after its caller gave up.
    """
    now = protocol.now_ms()
    deadline = headers.get(protocol.DEADLINE_HEADER)
    if deadline is None:
        try:
            ttl = int(expiration) if expiration else None
        except (TypeError, ValueError):
            ttl = None
        deadline = now + (ttl if ttl is not None and ttl >= 0
                          else protocol.seconds_to_ms(protocol.DEFAULT_EXPIRATION))
    elif not isinstance(deadline, int) or isinstance(deadline, bool):
        raise CodecError(f"header {protocol.DEADLINE_HEADER} must be an integer (epoch "
                         f"milliseconds), not {type(deadline).__name__}")
    return min(deadline, now + protocol.seconds_to_ms(protocol.MAX_EXPIRATION))
