"""crew: task-worker RPC over RabbitMQ, with an asyncio/Tornado client.

Workers register functions with ``@Task('name')`` (:mod:`crew.worker`); a :class:`Client`
calls them from any asyncio program and awaits the reply; a :class:`SyncClient` calls them
from threads that block (WSGI applications). See README.md.
"""

from .client import Client, Parallel
from .exceptions import (AuthenticationError, BrokerError, CallError, CodecError,
                         ConnectionLostError, CrewError, DecodeError, DeliveryLimitError,
                         EncodeError, ExpirationError, JobKilled, MessageTooLargeError, RemoteError,
                         TimeoutError, UnknownTaskError)
from .protocol import VERSION as _VERSION
from .settings import BrokerSettings
from .sync import SyncClient
from .worker import Task, Worker, context

__version__ = _VERSION

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "BrokerSettings",
    "CallError",
    "Client",
    "CodecError",
    "ConnectionLostError",
    "CrewError",
    "DecodeError",
    "DeliveryLimitError",
    "EncodeError",
    "ExpirationError",
    "JobKilled",
    "MessageTooLargeError",
    "Parallel",
    "RemoteError",
    "SyncClient",
    "Task",
    "TimeoutError",
    "UnknownTaskError",
    "Worker",
    "__version__",
    "context",
]
