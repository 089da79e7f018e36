"""Checks of what callers and task authors give crew: task and channel names, priorities,
expirations, queue maximums and user headers; and of the numbers in the maps workers send
(presence answers, figures), which anyone who may publish can forge.

Each ``validate_*`` returns its value when it is acceptable and raises ``TypeError`` or
``ValueError`` saying what is wrong otherwise; the limits are the wire's
(:mod:`crew.protocol`, docs/PROTOCOL.md)."""

from __future__ import annotations

import math
from typing import Any

from . import protocol

__all__ = ["are_counts", "is_count", "is_number", "validate_channel", "validate_expiration",
           "validate_max_priority", "validate_priority", "validate_task_name",
           "validate_user_headers"]


def validate_task_name(name: object) -> str:
    """Return ``name`` if it can name a task, else raise ``ValueError``/``TypeError``."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, not {type(name).__name__}")
    if not name or len(name.encode()) > 200:
        raise ValueError(f"task name must be 1 to 200 bytes long, got {name!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ValueError(f"task name must not contain spaces or control characters: {name!r}")
    return name


def validate_channel(name: object, *, pattern: bool = False) -> str:
    """Return ``name`` if it can name a pubsub channel (a routing key), else raise. With
    ``pattern`` the words ``*`` (one word) and ``#`` (any number of words) are allowed, as
    in AMQP topic bindings; a channel one publishes to must not contain them."""
    if not isinstance(name, str):
        raise TypeError(f"channel must be a str, not {type(name).__name__}")
    if not name or len(name.encode()) > 255:  # AMQP routing keys are short strings
        raise ValueError(f"channel must be 1 to 255 bytes long, got {name!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ValueError(f"channel must not contain spaces or control characters: {name!r}")
    if not pattern and any(word in ("*", "#") for word in name.split(".")):
        raise ValueError(f"wildcards are for subscribing, not publishing: {name!r}")
    return name


def validate_priority(priority: object) -> int:
    """Return ``priority`` if it is an int in 0..255, else raise."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise TypeError(f"priority must be an int, not {type(priority).__name__}")
    if not protocol.MIN_PRIORITY <= priority <= protocol.MAX_PRIORITY:
        raise ValueError(f"priority must be in {protocol.MIN_PRIORITY}.."
                         f"{protocol.MAX_PRIORITY}, got {priority}")
    return priority


def validate_expiration(expiration: object) -> float:
    """Return ``expiration`` in seconds if it is in (0, MAX_EXPIRATION], else raise."""
    if not isinstance(expiration, (int, float)) or isinstance(expiration, bool):
        raise TypeError(f"expiration must be a number of seconds, not {type(expiration).__name__}")
    if not 0 < expiration <= protocol.MAX_EXPIRATION:
        raise ValueError("expiration must be more than 0 and at most "
                         f"{protocol.MAX_EXPIRATION:g} seconds, got {expiration!r}")
    return float(expiration)


def validate_max_priority(value: object) -> int:
    """Return ``value`` if it can be a queue's ``x-max-priority`` (1..255), else raise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_priority must be an int, not {type(value).__name__}")
    if not 1 <= value <= protocol.MAX_PRIORITY:
        raise ValueError(f"max_priority must be in 1..{protocol.MAX_PRIORITY}, got {value}")
    return value


def validate_user_headers(headers: object) -> dict[str, Any]:
    """Return a copy of caller-supplied headers, refusing crew's and the broker's names."""
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict, not {type(headers).__name__}")
    for key in headers:
        if not isinstance(key, str):
            raise TypeError(f"header names must be str, got {key!r}")
        if protocol.is_reserved_header(key):
            raise ValueError(f"header name {key!r} is reserved (crew-* are crew's; x-death, "
                             "x-delivery-count, CC, BCC and the other names the broker "
                             "writes or acts on are the broker's)")
    return dict(headers)


#: The integers msgpack carries, whence every count and number of a worker's presence and
#: figures maps. JSON integers have any length: one of 400 digits overflows float arithmetic.
_INTEGERS = range(-2**63, 2**64)
_INT = {int}


def is_count(value: object) -> bool:
    """Whether ``value`` is an int (not a bool) that msgpack can carry."""
    return type(value) is int and value in _INTEGERS


def are_counts(values: list[Any]) -> bool:
    """Whether every one of ``values`` is a count (:func:`is_count`); as fast as a
    histogram's buckets need, taken in by the thousand per message."""
    return not values or ({*map(type, values)} == _INT and min(values) >= _INTEGERS.start
                          and max(values) < _INTEGERS.stop)


def is_number(value: object) -> bool:
    """Whether ``value`` is a finite float or an int that msgpack can carry."""
    return is_count(value) or (type(value) is float and math.isfinite(value))
