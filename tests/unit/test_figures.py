"""A worker's own figures (crew.figures): counts by task and outcome, run and queue-wait
histograms, the recent failures; recorded from many threads, counted at snapshot time."""

from __future__ import annotations

import asyncio
import threading
import time

from crew import figures, protocol
from crew.exceptions import JobKilled
from crew.figures import Figures, queue_wait
from crew.jobs import Job
from crew.metrics import BUCKETS


def job(task: str = "t", *, ttl_ms: int | None = None, left: float = 10.0,
        ran: float | None = None, number: int = 1) -> Job:
    """A job whose call has ``left`` seconds to its deadline and that ran ``ran`` seconds."""
    made = Job(None, task, print, number, f"c.{number}", "q", protocol.MSGPACK, None, b"", {},
               time.monotonic() + left)
    made.ttl = None if ttl_ms is None else str(ttl_ms)
    if ran is not None:
        made.started = time.monotonic() - ran
    return made


def bucket_of(seconds: float) -> int:
    return next((i for i, bound in enumerate(BUCKETS) if seconds <= bound), len(BUCKETS))


def test_outcomes_and_histograms_by_task():
    counts = Figures()
    counts.job_ended(job("a", ran=0.002), protocol.STATUS_OK)
    counts.job_ended(job("a", ran=0.2), protocol.STATUS_OK)
    failed = job("a", ran=0.003)
    failed.error_reply(ValueError("bad input"))
    counts.job_ended(failed, protocol.STATUS_ERROR)
    counts.job_ended(job("b"), protocol.STATUS_EXPIRED)  # never started: no run, no wait
    counts.job_ended(job("b", ran=1.0), "requeued")
    snap = counts.snapshot()
    assert snap["buckets"] == list(BUCKETS)
    a, b = snap["figures"]["a"], snap["figures"]["b"]
    assert a["outcomes"] == {"ok": 2, "remote_error": 1}
    assert sum(a["run"]) == 3 and len(a["run"]) == len(BUCKETS) + 1
    assert a["run"][bucket_of(0.2)] == 1 and a["run"][bucket_of(0.002)] == 1
    assert 0.2 < a["run_sum"] < 0.3
    assert b["outcomes"] == {"expired": 1, "requeued": 1}
    assert sum(b["run"]) == 1  # the expired one never ran


def test_counts_are_cumulative_across_snapshots():
    counts = Figures()
    counts.job_ended(job(ran=0.01), protocol.STATUS_OK)
    assert counts.snapshot()["figures"]["t"]["outcomes"] == {"ok": 1}
    counts.job_ended(job(ran=0.01), protocol.STATUS_OK)
    assert counts.snapshot()["figures"]["t"]["outcomes"] == {"ok": 2}
    assert counts.snapshot()["figures"]["t"]["outcomes"] == {"ok": 2}


def test_queue_wait_is_the_ttl_less_what_was_left_when_the_job_started():
    waited = job(ttl_ms=10_000, left=6.0)  # published with 10 s, started with 6 s left
    assert abs(queue_wait(waited, time.monotonic()) - 4.0) < 0.05
    assert queue_wait(job(ttl_ms=None), time.monotonic()) is None
    bad = job()
    bad.ttl = "not a number"
    assert queue_wait(bad, time.monotonic()) is None
    counts = Figures()
    counts.job_ended(job(ttl_ms=10_000, left=6.0, ran=0.0), protocol.STATUS_OK)
    wait = counts.snapshot()["figures"]["t"]["wait"]
    assert wait[bucket_of(4.0)] == 1


def test_failures_keep_the_newest_with_type_message_and_the_end_of_the_traceback():
    counts = Figures()
    for number in range(figures.KEEP_FAILURES + 5):
        failed = job(number=number, ran=0.0)
        try:
            raise RuntimeError("x" * 5000)
        except RuntimeError as exc:
            failed.error_reply(exc)
        counts.job_ended(failed, protocol.STATUS_ERROR)
    killed = job(number=99, ran=1.0)
    killed.error_reply(JobKilled("the job ran past its deadline"),
                       status=protocol.STATUS_TIMEOUT, with_traceback=False)
    counts.job_ended(killed, protocol.STATUS_TIMEOUT)
    counts.job_ended(job(number=100, ran=0.0), protocol.STATUS_OK)  # not a failure
    failures = counts.snapshot()["failures"]
    assert len(failures) == figures.KEEP_FAILURES
    assert failures[-1]["correlation_id"] == "c.99" and failures[-1]["outcome"] == "killed"
    assert failures[-1]["type"] == "JobKilled"
    first = failures[0]
    assert first["outcome"] == "remote_error" and first["type"] == "RuntimeError"
    assert first["correlation_id"] == f"c.{5 + 1}"  # the oldest ones are gone
    assert len(first["message"]) == figures.MESSAGE_CHARS
    assert len(first["traceback"]) <= figures.TRACEBACK_CHARS
    assert first["traceback"].rstrip().endswith("x")  # its end is kept: where it was raised
    assert isinstance(first["at"], int)


def test_calls_ended_by_many_threads_at_once_are_all_counted():
    counts = Figures()
    per_thread, threads = 2000, 8

    def end_calls() -> None:
        for _ in range(per_thread):
            counts.job_ended(job(ran=0.001), protocol.STATUS_OK)

    workers = [threading.Thread(target=end_calls) for _ in range(threads)]
    for thread in workers:
        thread.start()
    seen = [counts.snapshot() for _ in range(20)]  # snapshots while they record
    for thread in workers:
        thread.join()
    total = counts.snapshot()["figures"]["t"]
    assert total["outcomes"] == {"ok": per_thread * threads}
    assert sum(total["run"]) == per_thread * threads
    assert all(isinstance(s["figures"], dict) for s in seen)


def test_a_killed_job_keeps_the_kills_error_not_its_threads_late_one():
    killed = job(ran=1.0)
    killed.error_reply(JobKilled("the job ran past its deadline"),
                       status=protocol.STATUS_TIMEOUT, with_traceback=False)
    killed.error_reply(JobKilled(), with_traceback=False)  # its thread's, once the kill landed
    counts = Figures()
    counts.job_ended(killed, protocol.STATUS_TIMEOUT)
    [failure] = counts.snapshot()["failures"]
    assert failure["message"] == "the job ran past its deadline"


def test_where_tells_the_line_a_jobs_thread_or_coroutine_is_on():
    running, release = threading.Event(), threading.Event()

    def held_in_here() -> None:
        running.set()
        release.wait(10)

    threaded = job()
    threaded.thread = threading.Thread(target=held_in_here)
    threaded.thread.start()
    try:
        assert running.wait(10)
        assert "in held_in_here" in threaded.where() and "release.wait(10)" in threaded.where()
    finally:
        release.set()
        threaded.thread.join()
    assert threaded.where() == ""  # its thread ended
    assert job().where() == ""  # never started

    async def awaiting_in_here() -> None:
        await asyncio.sleep(10)

    async def look() -> str:
        coroutine = job()
        coroutine.coroutine = asyncio.ensure_future(awaiting_in_here())
        await asyncio.sleep(0)
        try:
            return coroutine.where()
        finally:
            coroutine.coroutine.cancel()

    assert "in awaiting_in_here" in asyncio.run(look())


def test_a_killed_job_without_a_place_keeps_the_kills_message_only():
    killed = job()
    killed.killed_reply("")
    assert killed.failure == {"type": "JobKilled", "message": "the job ran past its deadline",
                              "traceback": ""}
    placed = job()
    placed.killed_reply('  File "x.py", line 1, in f\n')
    assert placed.failure["traceback"].endswith('line 1, in f\n')
