"""Every name, argument and unit conversion of crew's wire protocol, in one place.

``docs/PROTOCOL.md`` describes the same facts for programs in other languages; when a value
here changes, that document changes with it. No other module spells a queue, exchange or
header name."""

from __future__ import annotations

import os
import time
from typing import Any, Final

# --- Exchanges and queues -------------------------------------------------------------

#: Task queues are ``crew.tasks.<task name>``, durable, one per task.
TASK_QUEUE_PREFIX: Final = "crew.tasks."

#: Headers exchange that every task queue dead-letters into. Each client binds its own reply
#: queue with ``{"x-match": "all", "crew-client": <reply queue>}``, so an expired call comes
#: back to the client that made it and to no other (the 2016 crew shared one dead-letter
#: queue between all gateways and lost the notices).
EXPIRED_EXCHANGE: Final = "crew.expired"

#: Fanout exchange for control messages to every worker (cancellation).
CONTROL_EXCHANGE: Final = "crew.control"

#: Stream bound to ``crew.control`` that keeps the cancel notices, so that a worker which
#: connects after a notice was sent still reads it (docs/PROTOCOL.md, section 7). A stream,
#: not a queue: every worker reads every notice, and reading does not consume it.
CANCEL_STREAM: Final = "crew.cancels"

#: Topic exchange for pubsub; the channel name is the routing key.
PUBSUB_EXCHANGE: Final = "crew.pubsub"

#: Fanout exchange for presence requests to every worker (docs/PROTOCOL.md, section 12); each
#: answers to the requester's reply queue. Not ``crew.control``: its stream keeps everything.
PRESENCE_EXCHANGE: Final = "crew.presence"
#: Fanout exchange on which each worker publishes its figures every FIGURES_INTERVAL seconds,
#: for dashboards (PROTOCOL.md 13); not ``crew.presence``, which every worker reads.
FIGURES_EXCHANGE: Final = "crew.figures"
FIGURES_INTERVAL: Final = 2.0

# --- Headers ----------------------------------------------------------------------------

#: Prefix of every header crew itself sets; user headers must not use it.
HEADER_PREFIX: Final = "crew-"
#: Absolute deadline of a call, integer milliseconds since the Unix epoch.
DEADLINE_HEADER: Final = "crew-deadline"
#: The caller's reply queue again, as a header: dead-lettering keeps headers, and the
#: headers exchange ``crew.expired`` can only route on headers, not on ``reply_to``.
CLIENT_HEADER: Final = "crew-client"
#: The task name, so a worker can refuse a call that reached the wrong queue.
TASK_HEADER: Final = "crew-task"
#: On replies: how the call ended, one of the ``STATUS_*`` values.
STATUS_HEADER: Final = "crew-status"

STATUS_OK: Final = "ok"
STATUS_ERROR: Final = "error"  # the task raised, or the call was malformed
STATUS_TIMEOUT: Final = "timeout"  # the job ran past its deadline and was interrupted
STATUS_EXPIRED: Final = "expired"  # the deadline passed before a worker started the job
STATUSES: Final = frozenset({STATUS_OK, STATUS_ERROR, STATUS_TIMEOUT, STATUS_EXPIRED})

#: On calls: the caller's gzip choice for the reply, a boolean; absent means automatic.
GZIP_HEADER: Final = "crew-gzip"

#: Header names the broker writes on messages or acts on, reserved like crew's own ``crew-*``:
#: dead-lettering's ``x-death``, quorum queues' delivery count, federation's and shovels'
#: hop records, streams' offsets, MQTT's and AMQP 1.0's sections, and the sender-selected
#: routing keys ``CC`` and ``BCC`` (a ``CC`` header on a call would copy it to other
#: queues). Every other name, ``x-request-id`` included, is the user's.
BROKER_HEADERS: Final = frozenset({
    "x-death", "x-delivery-count", "x-received-from", "x-shovelled",
    "x-shovelled-timestamp", "x-stream-offset", "x-mqtt-publish-qos", "CC", "BCC",
})
#: Prefixes of header names the broker writes (``x-first-death-reason``, ...).
BROKER_HEADER_PREFIXES: Final = ("x-first-death-", "x-last-death-", "x-amqp-1.0-", "x-opt-")
_RESERVED_PREFIXES: Final = (HEADER_PREFIX, *BROKER_HEADER_PREFIXES)

#: AMQP ``type`` property of control messages.
CANCEL_TYPE: Final = "crew.cancel"
#: ``type`` of the marker a worker writes to CANCEL_STREAM and reads back: it has read all.
MARKER_TYPE: Final = "crew.marker"
#: ``type`` of a presence request, of its answer (a map, PROTOCOL.md 12), of figures (13).
PRESENCE_REQUEST_TYPE: Final = "crew.presence.request"
PRESENCE_TYPE: Final = "crew.presence"
FIGURES_TYPE: Final = "crew.figures"
#: crew's version (``crew.__version__``), which workers report in their presence.
VERSION: Final = "0.1.0"

# --- Content ----------------------------------------------------------------------------

MSGPACK: Final = "application/msgpack"
JSON: Final = "application/json"
#: Content types understood on receipt, mapped to the canonical name.
CONTENT_TYPES: Final = {
    MSGPACK: MSGPACK,
    "application/x-msgpack": MSGPACK,
    JSON: JSON,
}
GZIP: Final = "gzip"

#: Largest body crew sends or accepts, compressed or not. It equals RabbitMQ 4.x's default
#: ``max_message_size`` (16 MiB): there a larger publish never reaches a worker, as the
#: broker closes the publisher's channel (406 PRECONDITION_FAILED). RabbitMQ 3.x's default
#: is 128 MiB, so there a larger body is delivered and crew refuses it.
MAX_BODY_BYTES: Final = 16 * 1024 * 1024
#: Largest body after gzip decompression; a gzip bomb stops here.
MAX_DECOMPRESSED_BYTES: Final = 64 * 1024 * 1024
#: Bodies at least this large are gzipped automatically when a sample shows it pays.
GZIP_THRESHOLD: Final = 64 * 1024

# --- Queue types ----------------------------------------------------------------------

CLASSIC: Final = "classic"
#: Replicated over a cluster's nodes (Raft); RabbitMQ 3.8+. See docs/PROTOCOL.md, 2.2.
QUORUM: Final = "quorum"
QUEUE_TYPES: Final = (CLASSIC, QUORUM)
#: Environment variable naming the task queue type when the worker is not told.
QUEUE_TYPE_ENV: Final = "CREW_QUEUE_TYPE"
#: ``x-delivery-limit`` of quorum task queues: a call given back this often (its worker died,
#: lost its connection, or stopped and requeued it) is dead-lettered on its next return, after
#: DELIVERY_LIMIT + 1 deliveries. Fixed, so every worker declares the same and a caller knows
#: the count (RabbitMQ 4.x's default is 20; 3.x has none).
DELIVERY_LIMIT: Final = 5
#: ``x-death`` reasons of a call dead-lettered for the delivery limit, and of an expired one.
DELIVERY_LIMIT_REASON: Final = "delivery_limit"
EXPIRED_REASON: Final = "expired"

# --- Priorities and deadlines -----------------------------------------------------------

MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 255
#: ``x-max-priority`` of task queues unless the worker is told otherwise. RabbitMQ
#: recommends at most 10 levels (each costs memory and CPU); a call's priority above the
#: queue's maximum counts as the maximum.
DEFAULT_QUEUE_MAX_PRIORITY: Final = 10

#: Seconds a call may take, queue time included, when the caller does not say.
DEFAULT_EXPIRATION: Final = 60.0
#: The longest expiration accepted: RabbitMQ's default ``consumer_timeout`` (30 minutes)
#: closes the channel of a worker that holds a delivery unacknowledged longer than that.
MAX_EXPIRATION: Final = 25 * 60.0

#: How long :data:`CANCEL_STREAM` keeps a notice: longer than any call can live. The broker
#: deletes a segment once all of it is older, hence small segments.
CANCEL_STREAM_MAX_AGE: Final = "1800s"
#: The most the stream keeps, about 150 000 notices; past it the oldest segments go.
CANCEL_STREAM_MAX_BYTES: Final = 32 * 1024 * 1024
CANCEL_STREAM_SEGMENT_BYTES: Final = 1024 * 1024


def task_queue(task: str) -> str:
    """The queue name of ``task``."""
    return TASK_QUEUE_PREFIX + task


def task_queue_arguments(max_priority: int, queue_type: str = CLASSIC) -> dict[str, Any]:
    """Arguments every task queue is declared with (docs/PROTOCOL.md, section 2.2); both
    dead-letter to ``crew.expired``. Quorum queues refuse ``x-max-priority`` (406) and order
    by priority themselves (4.x). Other values for an existing queue: 406 PRECONDITION_FAILED."""
    if queue_type == QUORUM:
        return {"x-queue-type": QUORUM, "x-dead-letter-exchange": EXPIRED_EXCHANGE,
                "x-delivery-limit": DELIVERY_LIMIT}
    return {"x-max-priority": max_priority, "x-dead-letter-exchange": EXPIRED_EXCHANGE,
            "x-queue-type": CLASSIC}


def queue_type(value: object = None) -> str:
    """The task queue type: ``value``, else ``$CREW_QUEUE_TYPE``, else ``classic``; raise
    ``ValueError`` (or ``TypeError``) naming the accepted values for anything else."""
    env = os.environ.get(QUEUE_TYPE_ENV) if value is None else None
    where = f" (from ${QUEUE_TYPE_ENV})" if env else ""
    value = value if value is not None else env or CLASSIC
    if not isinstance(value, str):
        raise TypeError(f"queue_type must be a str, not {type(value).__name__}")
    if value not in QUEUE_TYPES:
        raise ValueError(f"queue type must be one of {', '.join(QUEUE_TYPES)}, "
                         f"not {value!r}{where}")
    return value


def dead_letter(headers: dict[str, Any] | None) -> tuple[str, str]:
    """Why and from which task's queue the broker dead-lettered a call, by ``x-death``'s newest
    entry: its ``reason`` (``expired``, ``delivery_limit``, ...) and the task, each ``""``
    when the headers do not say (or are not in the broker's shape: anyone may publish)."""
    deaths = (headers or {}).get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths else None
    reason, queue = (_text(death.get(key)) if isinstance(death, dict) else ""
                     for key in ("reason", "queue"))
    return reason, queue[len(TASK_QUEUE_PREFIX):] if queue.startswith(TASK_QUEUE_PREFIX) else ""


def _text(value: object) -> str:
    """A header's text, which pika gives as bytes or str; ``""`` for anything else."""
    value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return value if isinstance(value, str) else ""


def cancel_stream_arguments() -> dict[str, Any]:
    """Arguments :data:`CANCEL_STREAM` is declared with (durable, like every stream);
    declaring it again with other values fails with 406 PRECONDITION_FAILED."""
    return {"x-queue-type": "stream", "x-max-age": CANCEL_STREAM_MAX_AGE,
            "x-max-length-bytes": CANCEL_STREAM_MAX_BYTES,
            "x-stream-max-segment-size-bytes": CANCEL_STREAM_SEGMENT_BYTES}


def expired_binding(reply_queue: str | None = None) -> dict[str, Any]:
    """Binding arguments that bring a client's dead letters to its own reply queue; without
    ``reply_queue``, every dead letter (a dashboard counts them: no header to match)."""
    return {"x-match": "all"} if reply_queue is None else {
        "x-match": "all", CLIENT_HEADER: reply_queue}


def now_ms() -> int:
    """Wall-clock time as integer epoch milliseconds, the unit of ``crew-deadline``."""
    return time.time_ns() // 1_000_000


def seconds_to_ms(seconds: float) -> int:
    """Seconds (the API's unit) to whole milliseconds (AMQP's), never below 1."""
    return max(1, int(seconds * 1000))


def ttl_property(deadline_ms: int) -> str:
    """The AMQP ``expiration`` property for a call due at ``deadline_ms``: the time left."""
    return str(max(1, deadline_ms - now_ms()))


def is_reserved_header(name: str) -> bool:
    """Whether ``name`` is crew's (``crew-*``) or the broker's (:data:`BROKER_HEADERS`)."""
    return name in BROKER_HEADERS or name.startswith(_RESERVED_PREFIXES)


def user_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """The headers of a message without crew's own and the broker's reserved ones."""
    return {k: v for k, v in (headers or {}).items()
            if isinstance(k, str) and not is_reserved_header(k)}
