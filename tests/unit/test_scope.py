"""What task code sees of its worker (a frozen Scope, not the Worker), the publisher behind
``context.pubsub`` (no broker)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from crew import EncodeError, codec, protocol
from crew.context import Context, Publisher, context
from crew.jobs import Job, Scope, current_job
from crew.registry import Settings


class _Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, str | None]] = []

    def __call__(self, channel: str, body: bytes, encoding: str | None) -> None:
        self.messages.append((channel, body, encoding))


def _scope(**settings: Any) -> Scope:
    return Scope(Settings(**settings), Publisher(_Sent()))


def _job(scope: Scope | None, func: Any) -> Job:
    body, _ = codec.encode(None)
    return Job(scope, "t", func, 1, "cid", "reply", protocol.MSGPACK, None, body, {"h": 1},
               time.monotonic() + 60)


@pytest.fixture
def bound_scope():
    """Restores what ``context`` means outside a job (module state) after the test."""
    saved = Context._scope
    yield
    Context._scope = saved


def test_a_scope_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        _scope().settings = Settings()  # type: ignore[misc]


def test_a_job_sees_its_own_scope_and_outside_a_job_the_last_bound(bound_scope):
    ours, other = _scope(name="ours"), _scope(name="other")
    context._bind(other)
    seen: list[Any] = []

    def task(_argument: Any) -> None:
        seen.extend([context.settings.name, context.pubsub, context.headers])

    reply = _job(ours, task).run_sync()
    assert reply.status == protocol.STATUS_OK
    assert seen == ["ours", ours.pubsub, {"h": 1}]
    assert current_job.get() is None
    assert context.settings.name == "other" and context.pubsub is other.pubsub
    with pytest.raises(RuntimeError, match="inside a job"):
        context.headers  # noqa: B018 - the property raises


def test_context_before_any_worker_started_says_so(bound_scope):
    Context._scope = None
    with pytest.raises(RuntimeError, match="once a worker has started"):
        context.settings  # noqa: B018 - the property raises
    outcome: list[str] = []

    def task(_argument: Any) -> None:  # a job made outside a worker (tests, benchmarks)
        try:
            context.settings  # noqa: B018 - the property raises
        except RuntimeError as exc:
            outcome.append(str(exc))

    _job(None, task).run_sync()
    assert outcome and "once a worker has started" in outcome[0]


def test_the_publisher_checks_and_encodes_then_hands_the_message_on():
    sent = _Sent()
    publisher = Publisher(sent)
    publisher.publish("news.sport", {"score": 1})
    (channel, body, encoding), = sent.messages
    assert channel == "news.sport" and codec.decode(body, protocol.MSGPACK, encoding) == {
        "score": 1}
    with pytest.raises(ValueError):
        publisher.publish("")
    with pytest.raises(EncodeError):
        publisher.publish("news", object())
    assert len(sent.messages) == 1
