"""crew.intake's decisions, against a channel that records what the worker asks of the broker.

The broker tests (tests/broker/test_intake.py, test_intake_quorum.py) show the guarantee end
to end on a real RabbitMQ; these pin down each decision behind it, one at a time: which
consumers start with which prefetch, when a call is turned back, when the worker consumes
again, and what a consumer the broker cancelled leads to.
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from crew.intake import Intake
from crew.memory import MemoryGate
from crew.replies import Replies


class RecordingChannel:
    """The part of :class:`crew.amqp.Channel` the intake uses; every request recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.consumers: dict[str, Callable[..., None]] = {}
        self.on_broker_cancel: Callable[[Any], None] | None = None
        self.is_open = True
        self._tags = itertools.count(1)

    async def qos(self, prefetch: int) -> None:
        self.calls.append(("qos", prefetch))

    async def consume(self, queue: str, on_message: Callable[..., None]) -> str:
        tag = f"ctag{next(self._tags)}"
        self.consumers[tag] = on_message
        self.calls.append(("consume", queue))
        return tag

    def cancel_nowait(self, tag: str) -> None:
        self.consumers.pop(tag, None)
        self.calls.append(("cancel", tag))

    def reject(self, delivery_tag: int, requeue: bool) -> None:
        self.calls.append(("reject", delivery_tag, requeue))

    def flush(self) -> None:
        pass

    def on_cancel(self, callback: Callable[[Any], None]) -> None:
        self.on_broker_cancel = callback

    def deliver(self, tag: str, delivery_tag: int) -> None:
        method = SimpleNamespace(delivery_tag=delivery_tag, consumer_tag=tag)
        self.consumers[tag](self, method, None, b"")

    def tag_of(self, queue: str) -> str:
        tags = [tag for tag, _ in self.consumers.items() if self._queue_of(tag) == queue]
        assert len(tags) == 1, (queue, self.calls)
        return tags[0]

    def _queue_of(self, tag: str) -> str:
        consumes = [c for c in self.calls if c[0] == "consume"]
        return consumes[int(tag.removeprefix("ctag")) - 1][1]

    def since(self, mark: int, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls[mark:] if c[0] == kind]


class Harness:
    """An intake of ``concurrency`` over ``queues``, whose calls are held until released."""

    def __init__(self, concurrency: int, queues: list[str], returns: bool = True) -> None:
        self.replies = Replies(lambda func, *args: func(*args), lambda job: None)
        self.replies.start()
        self.memory = MemoryGate(1 << 30)
        self.intake = Intake(concurrency, self.replies, self.memory)
        self.channel = RecordingChannel()
        self.delivered: list[tuple[str, int]] = []
        self.redeclared = 0
        self.queues, self.returns = queues, returns

    async def start(self) -> None:
        async def redeclare() -> None:
            self.redeclared += 1

        await self.intake.start(self.channel, {q: self._on_message(q) for q in self.queues},
                                redeclare, returns=self.returns)

    def _on_message(self, queue: str) -> Callable[..., None]:
        def on_message(_ch: Any, method: Any, _props: Any, _body: bytes) -> None:
            self.delivered.append((queue, method.delivery_tag))
            key = (queue, str(method.delivery_tag))
            self.replies.jobs[key] = SimpleNamespace(key=key)  # held until release()
            self.intake.check()
        return on_message

    def release(self, queue: str, delivery_tag: int) -> None:
        del self.replies.jobs[(queue, str(delivery_tag))]
        self.intake.check()


async def settle() -> None:
    """Let the tasks the intake started (consume again, restore) run to their end."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.gen_test
async def test_one_queue_consumes_once_with_the_concurrency_as_prefetch():
    h = Harness(3, ["q1"])
    await h.start()
    assert h.channel.calls == [("qos", 3), ("consume", "q1")]
    for delivery_tag in (1, 2, 3):
        h.channel.deliver(h.channel.tag_of("q1"), delivery_tag)
    await settle()
    # Full, but one queue's prefetch is the whole guarantee: nothing cancelled or rejected.
    assert h.channel.calls == [("qos", 3), ("consume", "q1")]


@pytest.mark.gen_test
async def test_several_queues_turn_back_a_call_past_the_limit_and_pause():
    h = Harness(2, ["q1", "q2"])
    await h.start()
    assert sorted(c[1] for c in h.channel.calls if c[0] == "consume") == ["q1", "q2"]
    mark = len(h.channel.calls)
    h.channel.deliver(h.channel.tag_of("q1"), 1)
    h.channel.deliver(h.channel.tag_of("q2"), 2)
    assert h.delivered == [("q1", 1), ("q2", 2)]
    assert h.channel.since(mark, "reject") == []
    h.channel.deliver(next(iter(h.channel.consumers)), 3)  # delivered before the pause
    assert h.delivered == [("q1", 1), ("q2", 2)], "a third call must not be let in"
    assert h.channel.since(mark, "reject") == [("reject", 3, True)]
    assert len(h.channel.since(mark, "cancel")) == 2
    assert h.channel.consumers == {}
    assert h.intake.rejects == 1 and h.intake.cancels == 2


@pytest.mark.gen_test
async def test_a_freed_slot_consumes_again_with_the_free_slots_as_prefetch():
    h = Harness(2, ["q1", "q2"])
    await h.start()
    h.channel.deliver(h.channel.tag_of("q1"), 1)
    h.channel.deliver(h.channel.tag_of("q2"), 2)
    h.channel.deliver(h.channel.tag_of("q1"), 3)  # turned back: paused
    mark = len(h.channel.calls)
    h.release("q1", 1)
    await settle()
    assert h.channel.since(mark, "qos") == [("qos", 1)]
    assert sorted(c[1] for c in h.channel.since(mark, "consume")) == ["q1", "q2"]
    # The queue consumed first takes turns, so that no queue is starved.
    firsts = [c[1] for c in h.channel.calls if c[0] == "consume"][::2]
    assert firsts[0] != firsts[1]


@pytest.mark.gen_test
async def test_a_call_waiting_for_memory_pauses_one_queue_too():
    h = Harness(4, ["q1"])
    await h.start()
    assert h.memory.admit("big", 1 << 30, lambda: None)
    assert not h.memory.admit("waits", 1, lambda: None)
    h.intake.check()
    assert h.channel.calls[-1][0] == "cancel" and h.channel.consumers == {}
    mark = len(h.channel.calls)
    h.memory.release("big")
    h.intake.check()
    await settle()
    assert h.channel.since(mark, "consume") == [("consume", "q1")]


@pytest.mark.gen_test
async def test_quorum_queues_never_turn_a_call_back():
    h = Harness(1, ["q1", "q2"], returns=False)
    await h.start()
    for delivery_tag, queue in enumerate(["q1", "q2", "q1", "q2"], start=1):
        h.channel.deliver(h.channel.tag_of(queue), delivery_tag)
    await settle()
    assert len(h.delivered) == 4, "a quorum worker holds up to its concurrency per queue"
    assert [c[0] for c in h.channel.calls] == ["qos", "consume", "consume"]


@pytest.mark.gen_test
@pytest.mark.parametrize("returns", [True, False])
async def test_a_consumer_the_broker_cancels_is_declared_and_consumed_again(returns, caplog):
    h = Harness(2, ["q1", "q2"], returns=returns)
    await h.start()
    tag = h.channel.tag_of("q1")
    h.channel.consumers.pop(tag)
    mark = len(h.channel.calls)
    h.channel.on_broker_cancel(SimpleNamespace(method=SimpleNamespace(consumer_tag=tag)))
    assert "the broker cancelled the worker's consumer of q1" in caplog.text
    for _ in range(100):  # the first retry waits a jittered 0.25 s at most
        await asyncio.sleep(0.05)
        if any(c == ("consume", "q1") for c in h.channel.calls[mark:]):
            break
    assert h.redeclared == 1
    assert ("consume", "q1") in h.channel.calls[mark:]
    h.channel.deliver(h.channel.tag_of("q1"), 7)
    assert h.delivered == [("q1", 7)]


@pytest.mark.gen_test
async def test_a_stopped_intake_cancels_its_consumers_and_consumes_no_more():
    h = Harness(2, ["q1", "q2"])
    await h.start()
    await h.intake.stop()
    assert h.channel.consumers == {}
    mark = len(h.channel.calls)
    h.intake.check()
    await settle()
    assert h.channel.since(mark, "consume") == []


@pytest.mark.gen_test
async def test_more_slots_freed_after_consuming_again_raise_the_prefetch():
    h = Harness(3, ["q1", "q2"])
    await h.start()
    for delivery_tag, queue in enumerate(["q1", "q2", "q1", "q2"], start=1):
        h.channel.deliver(h.channel.tag_of(queue), delivery_tag)  # the 4th is turned back
    h.release("q1", 1)
    await settle()
    mark = len(h.channel.calls)
    h.release("q2", 2)  # two free now, but the consumers started with prefetch 1
    await settle()
    assert len(h.channel.since(mark, "cancel")) == 2
    assert h.channel.since(mark, "qos") == [("qos", 2)]
    assert len(h.channel.since(mark, "consume")) == 2


@pytest.mark.gen_test
async def test_a_check_before_the_consume_again_has_run_starts_no_second_consumer():
    """A resume's consume runs as a task: a check in between (the loop ending several calls
    in one batch, or a call ended inside a check) must not consume again too. Before the
    fix, RabbitMQ 4.3 counted two consumers of the worker's one queue."""
    h = Harness(4, ["q1"])
    await h.start()
    h.channel.deliver(h.channel.tag_of("q1"), 1)
    h.channel.deliver(h.channel.tag_of("q1"), 2)
    assert h.memory.admit("big", 1 << 30, lambda: None)
    assert not h.memory.admit("waits", 1, lambda: None)
    h.intake.check()  # a call waits for memory: paused
    assert h.channel.consumers == {}
    h.memory.release("big")
    h.memory.release("waits")
    h.release("q1", 1)  # nothing waits, 3 free: consume again with prefetch 3
    await settle()
    assert len(h.channel.consumers) == 1
    mark = len(h.channel.calls)
    h.release("q1", 2)  # 4 free > 3: consume anew with prefetch 4 ...
    h.intake.check()  # ... and a check before that consume has run
    await settle()
    assert len(h.channel.consumers) == 1, h.channel.calls[mark:]
    assert h.channel.since(mark, "qos") == [("qos", 4)]
