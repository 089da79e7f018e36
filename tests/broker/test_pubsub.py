"""Pubsub: client.subscribe/unsubscribe/publish and context.pubsub.publish in workers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from crew import Client, ConnectionLostError, EncodeError
from crew.worker import context


class Inbox:
    """A subscription callback that keeps what it gets; ``await inbox.get()`` the next one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def __call__(self, data: Any) -> None:
        self.queue.put_nowait(data)

    async def get(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def empty(self) -> bool:
        return self.queue.empty()


# --- with the broker ----------------------------------------------------------------------

@pytest.mark.gen_test(timeout=20)
async def test_two_clients_get_every_message(make_client, uid):
    first, second, publisher = [await make_client() for _ in range(3)]
    inboxes = [Inbox(), Inbox()]
    await first.subscribe(f"news.{uid}", inboxes[0])
    await second.subscribe(f"news.{uid}", inboxes[1])
    for n in range(5):
        await publisher.publish(f"news.{uid}", {"n": n})
    for inbox in inboxes:
        assert [await inbox.get() for _ in range(5)] == [{"n": n} for n in range(5)]


@pytest.mark.gen_test(timeout=20)
async def test_publish_works_without_await(make_client, uid):
    subscriber, publisher = await make_client(), await make_client()
    inbox = Inbox()
    await subscriber.subscribe(f"plain.{uid}", inbox)
    publisher.publish(f"plain.{uid}", "fire and forget")  # not awaited, on purpose
    assert await inbox.get() == "fire and forget"


@pytest.mark.gen_test(timeout=20)
async def test_wildcards(make_client, uid):
    subscriber, publisher = await make_client(), await make_client()
    one_word, any_words = Inbox(), Inbox()
    await subscriber.subscribe(f"orders.{uid}.*", one_word)
    await subscriber.subscribe(f"audit.{uid}.#", any_words)
    for channel in (f"orders.{uid}.new", f"orders.{uid}.new.eu", f"audit.{uid}",
                    f"audit.{uid}.a.b", f"other.{uid}.new", f"orders.{uid}.paid"):
        await publisher.publish(channel, channel)
    assert await one_word.get() == f"orders.{uid}.new"
    assert await one_word.get() == f"orders.{uid}.paid"
    assert await any_words.get() == f"audit.{uid}"
    assert await any_words.get() == f"audit.{uid}.a.b"
    assert one_word.empty() and any_words.empty()


async def _settle(subscriber: Client, publisher: Client, uid: str) -> None:
    """Wait until everything published so far reached ``subscriber``: a marker published
    after it, on the same exchange to the same queue, arrives after it."""
    marker = Inbox()
    await subscriber.subscribe(f"marker.{uid}", marker)
    await publisher.publish(f"marker.{uid}", "marker")
    assert await marker.get() == "marker"
    await subscriber.unsubscribe(f"marker.{uid}", marker)


@pytest.mark.gen_test(timeout=20)
async def test_unsubscribe_stops_delivery(make_client, uid):
    subscriber, publisher = await make_client(), await make_client()
    kept, dropped = Inbox(), Inbox()
    channel = f"news.{uid}"
    await subscriber.subscribe(channel, kept)
    await subscriber.subscribe(channel, dropped)
    await publisher.publish(channel, 1)
    assert await kept.get() == 1 and await dropped.get() == 1

    await subscriber.unsubscribe(channel, dropped)  # one of two callbacks
    await publisher.publish(channel, 2)
    assert await kept.get() == 2
    await _settle(subscriber, publisher, uid)
    assert dropped.empty()

    await subscriber.unsubscribe(channel)  # every callback: the binding goes too
    await publisher.publish(channel, 3)
    await _settle(subscriber, publisher, uid)
    assert kept.empty()


def test_subscribe_before_connect(io_loop, broker_url, make_client, uid):
    subscriber = Client(broker_url)
    inbox = Inbox()
    # No event loop runs here, as when a module subscribes at import time.
    pending = subscriber.subscribe(f"early.{uid}", inbox)
    publisher = io_loop.run_sync(make_client)

    async def scenario() -> None:
        await pending
        await subscriber.connect()
        try:
            await publisher.publish(f"early.{uid}", "hello")
            assert await inbox.get() == "hello"
        finally:
            await subscriber.close()

    io_loop.run_sync(scenario, timeout=20)


@pytest.mark.gen_test(timeout=20)
async def test_subscriptions_survive_reconnection(make_client, uid):
    subscriber, publisher = await make_client(), await make_client()
    inbox = Inbox()
    await subscriber.subscribe(f"news.{uid}", inbox)
    await subscriber.close()
    with pytest.raises(ConnectionLostError):
        await subscriber.publish(f"news.{uid}", "while closed")
    await subscriber.connect()
    await publisher.publish(f"news.{uid}", "after")
    assert await inbox.get() == "after"


@pytest.mark.gen_test(timeout=20)
async def test_subscribing_while_the_binding_is_under_way(make_client, uid):
    subscriber, publisher = await make_client(), await make_client()
    first, second = Inbox(), Inbox()
    # The second subscribe finds the first one's bind under way; awaiting it waits for it.
    pending = subscriber.subscribe(f"news.{uid}", first)
    await subscriber.subscribe(f"news.{uid}", second)
    await publisher.publish(f"news.{uid}", "both")
    assert await first.get() == "both" and await second.get() == "both"
    await pending


@pytest.mark.gen_test(timeout=20)
async def test_coroutine_callbacks(make_client, uid):
    subscriber, publisher = await make_client(), await make_client()
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def callback(data: Any) -> None:
        await asyncio.sleep(0)
        got.set_result(data)

    await subscriber.subscribe(f"news.{uid}", callback)
    await publisher.publish(f"news.{uid}", [1, "two"])
    assert await asyncio.wait_for(got, 5) == [1, "two"]


@pytest.mark.gen_test(timeout=20)
async def test_a_failing_callback_does_not_stop_the_others(make_client, uid, caplog):
    subscriber, publisher = await make_client(), await make_client()
    inbox = Inbox()

    def broken(_data: Any) -> None:
        raise RuntimeError("broken callback")

    await subscriber.subscribe(f"news.{uid}", broken)
    await subscriber.subscribe(f"news.{uid}", inbox)
    with caplog.at_level(logging.ERROR, logger="crew.client"):
        await publisher.publish(f"news.{uid}", "still delivered")
        assert await inbox.get() == "still delivered"
    assert "broken callback" in caplog.text


@pytest.mark.gen_test(timeout=20)
async def test_publish_reports_data_it_cannot_send(client, uid):
    with pytest.raises(EncodeError):
        await client.publish(f"news.{uid}", object())
    with pytest.raises(ValueError):
        client.publish(f"news.{uid}.*", "wildcards are for subscribers")


@pytest.mark.gen_test(timeout=20)
async def test_workers_publish_from_threads_and_coroutines(make_worker, client, uid):
    channel = f"from-worker.{uid}"

    def sync_task(data: Any) -> str:
        context.pubsub.publish(channel, {"sync": data})
        return "published"

    async def async_task(data: Any) -> str:
        context.pubsub.publish(channel, {"async": data})
        return "published"

    make_worker({f"sync.{uid}": sync_task, f"async.{uid}": async_task})
    first, second = Inbox(), Inbox()
    await client.subscribe(channel, first)
    await client.subscribe(channel, second)
    assert await client.call(f"sync.{uid}", 1) == "published"
    assert await client.call(f"async.{uid}", 2) == "published"
    for inbox in (first, second):
        assert await inbox.get() == {"sync": 1}
        assert await inbox.get() == {"async": 2}
