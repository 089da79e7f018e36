"""How a call ended, in one word: the ``outcome`` label of crew's metrics and of its spans.

The client knows every way a call can end (:data:`CLIENT_OUTCOMES`); a worker knows how the
calls it served ended (:data:`WORKER_OUTCOMES`). :func:`of_exception` names what ended a
client's call, :func:`of_status` what a worker's reply said. README, "Metrics and traces",
lists them for users.
"""

from __future__ import annotations

import asyncio
from typing import Final

from . import protocol
from .exceptions import (CodecError, ConnectionLostError, CrewError, DeliveryLimitError,
                         ExpirationError, RemoteError, TimeoutError, UnknownTaskError)

__all__ = ["CLIENT_OUTCOMES", "WORKER_OUTCOMES", "of_exception", "of_status"]

OK: Final = "ok"
REMOTE_ERROR: Final = "remote_error"  # the task raised (or the worker refused the call)
EXPIRED: Final = "expired"  # no worker started the call before its deadline
TIMEOUT: Final = "timeout"  # no answer by the deadline: the client gave up by itself
KILLED: Final = "killed"  # the worker interrupted the job at its deadline
UNKNOWN_TASK: Final = "unknown_task"
CONNECTION_LOST: Final = "connection_lost"
CANCELLED: Final = "cancelled"  # the caller cancelled the call
DELIVERY_LIMIT: Final = "delivery_limit"  # a quorum queue gave the call up
REQUEUED: Final = "requeued"  # a worker handed the call back to its queue: it runs again
CODEC_ERROR: Final = "codec_error"  # the reply could not be read
ERROR: Final = "error"  # anything else (the broker returned the call for another reason)

CLIENT_OUTCOMES: Final = (OK, REMOTE_ERROR, EXPIRED, TIMEOUT, KILLED, UNKNOWN_TASK,
                          CONNECTION_LOST, CANCELLED, DELIVERY_LIMIT, CODEC_ERROR, ERROR)
WORKER_OUTCOMES: Final = (OK, REMOTE_ERROR, KILLED, EXPIRED, CANCELLED, REQUEUED)

_OF_STATUS: Final = {protocol.STATUS_OK: OK, protocol.STATUS_ERROR: REMOTE_ERROR,
                     protocol.STATUS_TIMEOUT: KILLED, protocol.STATUS_EXPIRED: EXPIRED,
                     CANCELLED: CANCELLED, REQUEUED: REQUEUED}
#: The first match counts: TimeoutError is looked at before this table.
_OF_ERROR: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (RemoteError, REMOTE_ERROR), (ExpirationError, EXPIRED), (UnknownTaskError, UNKNOWN_TASK),
    (ConnectionLostError, CONNECTION_LOST), (asyncio.CancelledError, CANCELLED),
    (DeliveryLimitError, DELIVERY_LIMIT), (CodecError, CODEC_ERROR), (CrewError, ERROR))


def of_exception(exc: BaseException | None) -> str:
    """The outcome of a client's call that ended with ``exc`` (None: its result)."""
    if exc is None:
        return OK
    if isinstance(exc, TimeoutError):
        return KILLED if exc.killed else TIMEOUT
    return next((outcome for kind, outcome in _OF_ERROR if isinstance(exc, kind)), ERROR)


def of_status(status: str) -> str:
    """The outcome of a call a worker served, by its reply's ``crew-status`` (or
    :data:`CANCELLED`: dropped without a reply; :data:`REQUEUED`: handed back)."""
    return _OF_STATUS.get(status, REMOTE_ERROR)
