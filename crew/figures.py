"""A worker's own figures of the calls it served, for the dashboard (:mod:`crew.board`).

Every worker keeps them, whether or not ``prometheus_client`` is installed: per task, how
many calls ended in each outcome (:data:`~crew.outcomes.WORKER_OUTCOMES`), and histograms of
how long the jobs ran and how long the calls waited in the queue, all counted since the
worker started; and its last :data:`KEEP_FAILURES` failures with their tracebacks. The
worker publishes them with its presence map every few seconds (:mod:`crew.presence`,
docs/PROTOCOL.md section 13); a dashboard turns two such snapshots into rates and
percentiles, so that nothing but the workers holds state.

Recording a call is an append to a deque from whatever thread ended it (a job thread or
the loop), and no lock; the worker's loop counts the events into the histograms when it
takes a :meth:`Figures.snapshot`, every few seconds.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from typing import Any

from . import outcomes, protocol
from .jobs import Job
from .metrics import BUCKETS

__all__ = ["KEEP_FAILURES", "Figures", "queue_wait"]

#: Failures a worker keeps (and publishes), the newest.
KEEP_FAILURES = 10
#: Characters of a failure's traceback that are kept: its end, where it was raised.
TRACEBACK_CHARS = 4000
MESSAGE_CHARS = 1000
#: Outcomes that are failures, listed with their error.
FAILED = frozenset({outcomes.REMOTE_ERROR, outcomes.KILLED, outcomes.EXPIRED})


class _Task:
    """One task's counts: outcomes, and run and wait histograms (a count per bucket, the
    last past every bound)."""

    __slots__ = ("outcomes", "run", "run_sum", "wait", "wait_sum")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.run = [0] * (len(BUCKETS) + 1)
        self.wait = [0] * (len(BUCKETS) + 1)
        self.run_sum = self.wait_sum = 0.0

    def add(self, outcome: str, run: float | None, wait: float | None) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if run is not None:
            self.run[bisect_left(BUCKETS, run)] += 1
            self.run_sum += run
        if wait is not None:
            self.wait[bisect_left(BUCKETS, wait)] += 1
            self.wait_sum += wait

    def as_map(self) -> dict[str, Any]:
        return {"outcomes": dict(self.outcomes), "run": list(self.run),
                "run_sum": round(self.run_sum, 6), "wait": list(self.wait),
                "wait_sum": round(self.wait_sum, 6)}


class Figures:
    """The figures of one worker's calls, from its start."""

    def __init__(self) -> None:
        self._events: collections.deque[tuple[str, str, float | None, float | None]] = (
            collections.deque())
        self._tasks: dict[str, _Task] = {}
        self._failures: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=KEEP_FAILURES)

    def job_ended(self, job: Job, status: str) -> None:
        """``job``'s call ended with a reply of ``status`` (or ``cancelled``, ``requeued``:
        :func:`crew.outcomes.of_status`); from any thread, once per call."""
        outcome = outcomes.of_status(status)
        started = job.started
        if started is None:  # it never ran: expired, refused or cancelled while waiting
            run = wait = None
        else:
            run, wait = time.monotonic() - started, queue_wait(job, started)
        self._events.append((job.task, outcome, run, wait))
        if outcome in FAILED:
            self._failures.append(_failure(job, outcome))

    def snapshot(self) -> dict[str, Any]:
        """``buckets``, ``figures`` and ``failures`` of docs/PROTOCOL.md section 13; on the
        worker's loop (one thread at a time)."""
        events, tasks = self._events, self._tasks
        for _ in range(len(events)):  # what job threads append meanwhile waits for the next
            task, outcome, run, wait = events.popleft()
            counts = tasks.get(task)
            if counts is None:
                counts = tasks[task] = _Task()
            counts.add(outcome, run, wait)
        return {"buckets": list(BUCKETS),
                "figures": {task: counts.as_map() for task, counts in tasks.items()},
                "failures": list(self._failures)}


def queue_wait(job: Job, started: float) -> float | None:
    """Seconds the call waited from its publication until ``started`` (monotonic): its TTL
    then (the AMQP ``expiration`` its client set to deadline - now) less what was left of
    it at ``started``. Needs the clocks of client and worker in sync; None without a TTL."""
    try:
        ttl = int(job.ttl) / 1000  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return max(0.0, ttl - (job.deadline - started))


def _failure(job: Job, outcome: str) -> dict[str, Any]:
    error = job.failure or {}
    return {"task": job.task, "correlation_id": job.correlation_id, "at": protocol.now_ms(),
            "outcome": outcome, "type": str(error.get("type") or "Error"),
            "message": str(error.get("message") or "")[:MESSAGE_CHARS],
            "traceback": str(error.get("traceback") or "")[-TRACEBACK_CHARS:]}
