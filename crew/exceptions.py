"""The errors crew raises, all rooted at :class:`CrewError`.

::

    CrewError
    ├── CallError                       a call ended without a result
    │   ├── RemoteError                 the task raised; .type, .message, .traceback
    │   ├── TimeoutError                the job ran past its deadline and was interrupted
    │   │                               (.killed True), or no answer came by the deadline
    │   │                               (.killed False) (also builtins.TimeoutError)
    │   ├── ExpirationError             no worker started the call before its deadline
    │   │                               (also builtins.TimeoutError)
    │   ├── UnknownTaskError            no queue exists for the task name (also LookupError)
    │   └── DeliveryLimitError          a quorum queue gave the call up after delivering it
    │                                   DELIVERY_LIMIT + 1 times (its worker died each time)
    ├── ConnectionLostError             the broker connection is gone (also ConnectionError)
    │   └── AuthenticationError         login refused, or the broker's certificate failed
    │                                   verification: not retried
    ├── BrokerError                     the broker refused an operation (a 406 on declare, ...)
    └── CodecError                      a body could not be encoded or decoded (also ValueError)
        ├── EncodeError                 the value cannot be sent (also TypeError)
        ├── DecodeError                 the bytes are not a valid crew body
        └── MessageTooLargeError        over the documented size limits

:class:`JobKilled` is not in the tree on purpose: it is raised *inside a job thread* to stop
it, and subclasses :class:`SystemExit` so that a task's ``except Exception`` does not swallow
it. Where crew's names shadow builtins (``TimeoutError``), they also subclass the builtin, so
``except`` clauses of either kind work.
"""

from __future__ import annotations

import builtins

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "CallError",
    "CodecError",
    "ConnectionLostError",
    "CrewError",
    "DecodeError",
    "DeliveryLimitError",
    "EncodeError",
    "ExpirationError",
    "JobKilled",
    "MessageTooLargeError",
    "RemoteError",
    "TimeoutError",
    "UnknownTaskError",
]


class CrewError(Exception):
    """Root of every error crew raises."""


class CallError(CrewError):
    """A call ended without a result."""


class RemoteError(CallError):
    """The task raised an exception on the worker.

    Nothing is unpickled: the worker sends the exception's class name, its message and the
    formatted traceback as text.
    """

    def __init__(self, type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.traceback = traceback


class TimeoutError(CallError, builtins.TimeoutError):
    """The call did not finish by its deadline.

    Raised when the worker interrupted the job at the deadline (:attr:`killed` is True),
    and when no answer at all reached the caller by then (the job may or may not have run;
    :attr:`killed` is False).
    """

    #: True if the worker said it interrupted the job at its deadline; False if the client
    #: gave up waiting by itself (the metrics' outcomes ``killed`` and ``timeout``).
    killed: bool

    def __init__(self, *args: object, killed: bool = False) -> None:
        super().__init__(*args)
        self.killed = killed


class ExpirationError(CallError, builtins.TimeoutError):
    """No worker started the call before its deadline ("all workers are gone")."""


class UnknownTaskError(CallError, LookupError):
    """No queue exists for the task: no worker has ever served it on this vhost."""

    def __init__(self, task: str) -> None:
        super().__init__(f"unknown task {task!r}: no queue crew.tasks.{task} exists")
        self.task = task


class DeliveryLimitError(CallError):
    """A quorum task queue dead-lettered the call: it was delivered ``deliveries`` times and
    never answered (its worker died, or lost its connection, every time: a *poison call*).

    The task may have run, partly, each time. The broker does not offer it again.
    """

    def __init__(self, task: str, deliveries: int) -> None:
        super().__init__(
            f"the call to {task!r} was delivered {deliveries} times and never answered (its "
            "worker died or lost its connection each time); the task queue's delivery limit "
            "gave it up")
        self.task = task
        self.deliveries = deliveries


class ConnectionLostError(CrewError, ConnectionError):
    """The connection to the broker is gone or could not be made."""


class AuthenticationError(ConnectionLostError):
    """The broker refused the login, or its TLS certificate failed verification.

    Connecting again cannot help, so crew does not retry: fix the credentials, the vhost
    permissions or the CA file.
    """


class BrokerError(CrewError):
    """The broker refused an operation; ``code`` and ``text`` are its reply."""

    def __init__(self, message: str, code: int = 0, text: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.text = text


class CodecError(CrewError, ValueError):
    """A body could not be encoded or decoded."""


class EncodeError(CodecError, TypeError):
    """A value cannot be encoded in the chosen content type."""


class DecodeError(CodecError):
    """Bytes received are not a valid body (bad content type, encoding or data)."""


class MessageTooLargeError(CodecError):
    """A body, compressed or decompressed, is over crew's documented limits."""


class JobKilled(SystemExit):
    """Raised inside a job's thread to stop it (deadline passed, or the call was cancelled).

    A subclass of :class:`SystemExit`, so ``except Exception`` in a task does not catch it.
    A task that must clean up can catch it, clean up quickly and re-raise.
    """
