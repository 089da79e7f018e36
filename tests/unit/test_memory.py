"""The memory gate and the worker's memory limits, without a broker (a worker under a
ceiling: tests/broker/test_memory.py)."""

from __future__ import annotations

import gzip
import json

import msgpack
import pytest

from crew import budget, codec
from crew.memory import MemoryGate
from crew.protocol import JSON, MSGPACK
from crew.worker import MIN_MAX_MEMORY, Worker


def test_calls_start_while_they_fit_and_wait_in_order_after():
    gate, started = MemoryGate(100), []
    assert gate.admit("a", 60, lambda: started.append("a"))
    assert not gate.admit("b", 50, lambda: started.append("b"))
    assert not gate.admit("c", 10, lambda: started.append("c"))  # fits, but b came first
    assert started == ["a"] and gate.is_waiting("b") and gate.is_waiting("c")
    gate.release("a")
    assert started == ["a", "b", "c"] and gate.reserved == 60


def test_a_call_alone_starts_whatever_it_needs_and_released_waiters_leave():
    gate, started = MemoryGate(100), []
    assert gate.admit("a", 100, lambda: started.append("a"))
    assert not gate.admit("b", 100, lambda: started.append("b"))
    gate.release("b")  # b no longer waits (cancelled, expired, requeued)
    assert not gate.is_waiting("b")
    gate.release("a")
    assert started == ["a"] and gate.reserved == 0


def test_decode_memory_of_the_benchmark_bodies_is_small():
    assert codec.decode_memory(msgpack.packb(bytes(100)), MSGPACK) < 64 * 1024
    one_mb = msgpack.packb(bytes(1_000_000))
    assert codec.decode_memory(one_mb, MSGPACK) <= 5 * len(one_mb) + 1024
    text = gzip.compress(msgpack.packb("word " * 200_000))
    inflated = len(msgpack.packb("word " * 200_000))
    assert codec.decode_memory(text, MSGPACK, "gzip") == len(text) + 5 * inflated + 1024


def test_decode_memory_of_containers_is_the_budget_bound():
    body = msgpack.packb([[]] * 1_000_000)
    assert codec.decode_memory(body, MSGPACK) == len(body) + budget.bound(len(body))
    text = json.dumps([[]] * 1_000_000).encode()
    assert codec.decode_memory(text, JSON) == 5 * len(text) + budget.bound(len(text))


def test_gzip_is_reserved_by_its_declared_size_and_held_to_it():
    inflated = msgpack.packb([[]] * 2_000_000)
    body = bytearray(gzip.compress(inflated))
    assert codec.decode_memory(bytes(body), MSGPACK, "gzip") == (
        len(body) + len(inflated) + budget.bound(len(inflated)))
    body[-4:] = (100).to_bytes(4, "little")  # a lie: 100 bytes
    with pytest.raises(codec.MessageTooLargeError, match="more than 100 bytes"):
        codec.decode(bytes(body), MSGPACK, "gzip")


def test_max_memory_is_checked():
    with pytest.raises(ValueError, match="max_memory"):
        Worker({"t": lambda x: x}, broker="amqp://localhost", max_memory=MIN_MAX_MEMORY - 1)
