"""Who sends a worker's reply (crew/calls.py): the job thread of the only call being served
sends it and the acknowledgement itself, without waking the worker's loop; with other calls
under way the loop sends replies in batches; a call given up on just as its job ended is
answered by the job's thread alone, never acknowledged twice. On the real broker."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

import pytest

from crew.amqp import Channel
from crew.calls import CallHandler


@pytest.fixture(autouse=True)
def _fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends from job threads exist on crew's fast path to pika only (crew/transport.py)."""
    monkeypatch.setenv("CREW_PIKA_PATH", "fast")


class Sends(list):  # type: ignore[type-arg]
    """(thread name, whether it was sent) per reply a job thread tried to send itself. A
    send is recorded once it returns, which can be after the caller has the reply:
    :meth:`reach` waits for that."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def record(self, name: str, sent: bool) -> None:
        with self.changed:
            self.append((name, sent))
            self.changed.notify_all()

    def reach(self, count: int, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self) >= count, timeout)


@pytest.fixture
def thread_sends(monkeypatch: pytest.MonkeyPatch) -> Sends:
    """Every reply a job thread tried to send itself."""
    sends = Sends()
    send = Channel.publish_and_ack_now

    def recorded(self: Channel, *args: Any, **kwargs: Any) -> bool:
        sent = send(self, *args, **kwargs)
        sends.record(threading.current_thread().name, sent)
        return sent

    monkeypatch.setattr(Channel, "publish_and_ack_now", recorded)
    return sends


def _count_loop_wakes(worker: Any) -> list[int]:
    """Count the runs of the worker loop's reply handler (the loop woken for replies)."""
    runs: list[int] = []
    handler = worker._calls.replies
    answer_finished = handler._answer_finished
    handler._answer_finished = lambda: (runs.append(1), answer_finished())[1]
    return runs


async def _on_worker_loop(worker: Any, func: Callable[[], Any]) -> Any:
    """``func()`` run on the worker's own loop (its state is not for other threads)."""
    return await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(_call(func), worker._loop))


async def _call(func: Callable[[], Any]) -> Any:
    return func()


@pytest.mark.gen_test(timeout=60)
async def test_a_lone_call_is_answered_by_its_job_thread_without_waking_the_loop(
        make_worker, client, uid, thread_sends):
    worker = make_worker({f"echo.{uid}": lambda x: x}, concurrency=4)
    assert await client.call(f"echo.{uid}", "warm") == "warm"
    wakes = _count_loop_wakes(worker)
    for n in range(5):
        assert await client.call(f"echo.{uid}", n) == n
    assert await asyncio.to_thread(thread_sends.reach, 6)
    assert len(thread_sends) == 6
    assert all(name.startswith("crew-job-") and sent for name, sent in thread_sends)
    assert wakes == []
    # The loop forgets the answered calls when it next looks: none is left served.
    assert await _on_worker_loop(worker, lambda: worker._calls.serving) == 0


@pytest.mark.gen_test(timeout=60)
async def test_with_another_call_under_way_the_loop_sends_the_reply(
        make_worker, client, uid, thread_sends):
    started = {name: threading.Event() for name in "ab"}
    release = {name: threading.Event() for name in "ab"}

    def waiting(name: str) -> Callable[[Any], str]:
        def work(_data: Any) -> str:
            started[name].set()
            release[name].wait(30)
            return name
        return work

    worker = make_worker({f"a.{uid}": waiting("a"), f"b.{uid}": waiting("b")}, concurrency=2)
    wakes = _count_loop_wakes(worker)
    a = asyncio.ensure_future(client.call(f"a.{uid}"))
    b = asyncio.ensure_future(client.call(f"b.{uid}"))
    for name in "ab":
        assert await asyncio.to_thread(started[name].wait, 10)
    release["a"].set()
    assert await a == "a"
    assert thread_sends == [] and wakes == [1]  # b runs still: a went out with the loop
    release["b"].set()
    assert await b == "b"
    assert await asyncio.to_thread(thread_sends.reach, 1)
    assert [sent for _, sent in thread_sends] == [True]  # alone now: its thread sent it


@pytest.mark.gen_test(timeout=60)
async def test_a_stop_ends_as_soon_as_the_last_job_does(make_worker, client, uid,
                                                         thread_sends):
    started, release = threading.Event(), threading.Event()

    def slow(data: Any) -> Any:
        started.set()
        release.wait(30)
        return data

    worker = make_worker({f"slow.{uid}": slow}, concurrency=1, grace=40)
    waiting, stopped = threading.Event(), threading.Event()
    wait_for_jobs = worker._wait_for_jobs

    async def watched(grace: float) -> None:
        waiting.set()
        await wait_for_jobs(grace)
        stopped.set()

    worker._wait_for_jobs = watched
    call = asyncio.ensure_future(client.call(f"slow.{uid}", "done", expiration=50))
    assert await asyncio.to_thread(started.wait, 10)
    worker.request_stop()
    assert await asyncio.to_thread(waiting.wait, 10)  # the stop waits for the running job
    ended = time.monotonic()
    release.set()
    assert await call == "done"
    # The job's thread answered it and woke the loop, which a stop waits on: the stop did
    # not wait for the 40 s grace to end.
    assert await asyncio.to_thread(stopped.wait, 20)
    assert time.monotonic() - ended < 15
    assert [sent for _, sent in thread_sends] == [True]


@pytest.fixture
def held_sends(monkeypatch: pytest.MonkeyPatch) -> dict[str, threading.Event]:
    """The first thread send of a reply to the call with data "hold" waits for ``proceed``
    (set by the test), after setting ``holding``; ``sent`` is set once it went out."""
    events = {name: threading.Event() for name in ("holding", "proceed", "sent")}
    send = Channel.publish_and_ack_now

    def held(self: Channel, *args: Any, **kwargs: Any) -> bool:
        if b"hold" in args[2] and not events["holding"].is_set():
            events["holding"].set()
            events["proceed"].wait(30)
            try:
                return send(self, *args, **kwargs)
            finally:
                events["sent"].set()
        return send(self, *args, **kwargs)

    monkeypatch.setattr(Channel, "publish_and_ack_now", held)
    return events


@pytest.mark.gen_test(timeout=60)
async def test_a_cancel_that_comes_as_the_job_ends_leaves_the_answer_to_its_thread(
        make_worker, client, uid, held_sends, monkeypatch):
    cancels = threading.Event()
    on_cancel = CallHandler.on_cancel
    monkeypatch.setattr(CallHandler, "on_cancel",
                        lambda self, *a: (on_cancel(self, *a), cancels.set())[0])
    worker = make_worker({f"echo.{uid}": lambda x: x}, concurrency=1)
    assert await client.call(f"echo.{uid}", "warm") == "warm"
    channel = worker._calls.channel
    call = asyncio.ensure_future(client.call(f"echo.{uid}", "hold"))
    assert await asyncio.to_thread(held_sends["holding"].wait, 10)  # the job has ended
    call.cancel()  # the client broadcasts a cancel notice
    assert await asyncio.to_thread(cancels.wait, 10)  # the worker saw it
    held_sends["proceed"].set()
    assert await asyncio.to_thread(held_sends["sent"].wait, 10)
    # Had the loop acknowledged the cancelled call too, the broker would have closed the
    # channel for the second ack (406 unknown delivery tag) and the worker reconnected.
    assert await client.call(f"echo.{uid}", "next") == "next"
    assert worker._calls.channel is channel


@pytest.mark.gen_test(timeout=60)
async def test_a_call_whose_job_ended_as_the_grace_ran_out_is_answered_not_requeued(
        make_worker, client, uid, held_sends):
    runs: list[str] = []

    def echo(data: Any) -> Any:
        runs.append(data)
        return data

    first = make_worker({f"echo.{uid}": echo}, concurrency=1)
    call = asyncio.ensure_future(client.call(f"echo.{uid}", "hold"))
    assert await asyncio.to_thread(held_sends["holding"].wait, 10)  # the job has ended
    requeue_running = first._calls.requeue_running

    def requeue_then_let_the_thread_send() -> None:
        requeue_running()  # the grace is over: unfinished jobs are requeued, not this one
        held_sends["proceed"].set()
        held_sends["sent"].wait(10)

    first._calls.requeue_running = requeue_then_let_the_thread_send
    first.request_stop(grace=0)
    assert await call == "hold"
    make_worker({f"echo.{uid}": echo}, concurrency=1)
    # Queued behind a requeued copy, if there were one: that copy would have run first.
    assert await client.call(f"echo.{uid}", "probe") == "probe"
    assert runs == ["hold", "probe"]
