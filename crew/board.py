"""What a dashboard shows, made from the figures workers publish (docs/PROTOCOL.md, section
13): the tasks, the workers, the calls running now and the recent failures.

A :class:`Board` holds nothing but what the workers sent in the last minute or so: each
worker's latest map and the figures it sent over the last :data:`WINDOW` seconds. Rates and
percentiles are the difference between a worker's newest figures and its oldest within the
window (both counted since the worker started), summed over workers; so a dashboard that
restarts shows everything again after two figures messages. It does no I/O:
:mod:`crew.watcher` feeds it, :mod:`crew.dashboard` serves :meth:`Board.view`.

Anyone who may publish to the vhost may publish figures: a map that is not one is ignored,
and what a board keeps is bounded (:data:`MAX_WORKERS`, :data:`MAX_TASKS`).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable, Mapping

from . import outcomes, protocol

__all__ = ["MAX_CALLS", "MAX_FAILURES", "WINDOW", "Board", "quantile"]

#: Seconds the rates and percentiles are taken over.
WINDOW = 60.0
#: A worker unheard of for this many of its intervals is shown stale; for FORGET_AFTER
#: seconds, forgotten.
STALE_INTERVALS = 3
FORGET_AFTER = 60.0
#: Seconds a task stays listed after the last worker that served it went: a queue whose
#: workers are all gone is what an operator most needs to see.
KEEP_TASKS = 3600.0
#: What a board keeps and shows at most.
MAX_WORKERS = 1000
MAX_TASKS = 5000
MAX_CALLS = 500
MAX_FAILURES = 50


class _Worker:
    """One worker's latest map, and its figures over the window: ``(monotonic time,
    figures)``, oldest first."""

    __slots__ = ("map", "seen", "history")

    def __init__(self) -> None:
        self.map: dict[str, Any] = {}
        self.seen = 0.0
        self.history: collections.deque[tuple[float, dict[str, Any]]] = collections.deque()


class Board:
    """The workers' figures over the last :data:`WINDOW` seconds, and the calls dead-lettered
    by the broker (expired in their queue) that the dashboard counted."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._workers: dict[str, _Worker] = {}
        self._dead: dict[str, collections.deque[tuple[float, str]]] = {}
        #: Every task a worker served, and when it was last heard of.
        self._known: dict[str, float] = {}

    def heard(self, figures: object, now: float) -> bool:
        """Take a worker's figures message (decoded), heard at ``now`` (monotonic); False if
        it is not one. A worker that says it stops is forgotten at once."""
        if not isinstance(figures, dict) or not isinstance(figures.get("worker"), str):
            return False
        name = figures["worker"]
        if figures.get("stopping") is True:
            self._workers.pop(name, None)
            return True
        worker = self._workers.get(name)
        if worker is None:
            if len(self._workers) >= MAX_WORKERS:
                return False
            worker = self._workers[name] = _Worker()
            if _number(figures.get("uptime"), -1) >= 0 and figures["uptime"] < self.window:
                worker.history.append((now - figures["uptime"], {}))  # it started from zero
        tasks = figures.get("figures")
        worker.map, worker.seen = figures, now
        for task in figures.get("tasks") or ():
            if isinstance(task, str) and (task in self._known or len(self._known) < MAX_TASKS):
                self._known[task] = now
        worker.history.append((now, dict(tasks) if isinstance(tasks, dict) else {}))
        while len(worker.history) > 2 and worker.history[1][0] <= now - self.window:
            worker.history.popleft()
        return True

    def dead_lettered(self, task: str, reason: str, now: float) -> None:
        """The broker dead-lettered a call of ``task`` (``reason``: expired, delivery_limit)."""
        if task in self._dead or len(self._dead) < MAX_TASKS:
            self._dead.setdefault(task, collections.deque()).append((now, reason))

    def tasks(self) -> list[str]:
        """Every task a worker served in the last KEEP_TASKS seconds or that had calls
        dead-lettered in the window, by name."""
        return sorted(set(self._known) | set(self._dead))[:MAX_TASKS]

    def queue_gone(self, task: str) -> None:
        """``task``'s queue does not exist (any more): list it no more, once no worker
        serves it."""
        self._known.pop(task, None)

    def find_call(self, correlation_id: str) -> dict[str, Any] | None:
        """The call ``correlation_id`` as a live worker last said it serves it, or None."""
        for worker in self._workers.values():
            for call in worker.map.get("calls") or ():
                if isinstance(call, dict) and call.get("correlation_id") == correlation_id:
                    return call
        return None

    def forget_old(self, now: float) -> None:
        """Forget workers unheard of for FORGET_AFTER seconds, and old dead letters."""
        for name in [n for n, w in self._workers.items() if now - w.seen > FORGET_AFTER]:
            del self._workers[name]
        for task in [t for t, seen in self._known.items() if now - seen > KEEP_TASKS]:
            del self._known[task]
        for task in list(self._dead):
            dead = self._dead[task]
            while dead and dead[0][0] < now - self.window:
                dead.popleft()
            if not dead:
                del self._dead[task]

    def view(self, now: float, now_ms: int,
             queues: Mapping[str, tuple[int, int] | None]) -> dict[str, Any]:
        """What the page shows (README, "The dashboard"), at ``now`` (monotonic) and
        ``now_ms`` (epoch ms); ``queues``: each task queue's (messages, consumers), None
        for a queue that does not exist (tasks missing there: not known)."""
        self.forget_old(now)
        workers = sorted(self._workers.values(),
                         key=lambda w: (str(w.map.get("host")), _number(w.map.get("pid"), 0)))
        return {"window": self.window,
                "tasks": self._task_rows(workers, queues),
                "workers": [_worker_row(w, now) for w in workers],
                "calls": _calls(workers, now, now_ms),
                "failures": _failures(workers)}

    def _task_rows(self, workers: list[_Worker],
                   queues: Mapping[str, tuple[int, int] | None]) -> list[dict[str, Any]]:
        sums: dict[str, _Sum] = {}
        serving: collections.Counter[str] = collections.Counter()
        for worker in workers:
            serving.update(t for t in worker.map.get("tasks") or () if isinstance(t, str))
            _add_deltas(worker, sums)
        rows = []
        for task in self.tasks():
            total = sums.get(task) or _Sum(0)
            dead = collections.Counter(reason for _, reason in self._dead.get(task, ()))
            counts = queues.get(task)
            rows.append({
                "task": task, "messages": counts[0] if counts else None,
                "consumers": counts[1] if counts else None, "workers": serving[task],
                "rate": round(total.ended / total.seconds, 3) if total.seconds else None,
                "p50": quantile(0.5, total.buckets, total.run),
                "p95": quantile(0.95, total.buckets, total.run),
                "wait_p50": quantile(0.5, total.buckets, total.wait),
                "wait_p95": quantile(0.95, total.buckets, total.wait),
                "errors": total.outcomes[outcomes.REMOTE_ERROR],
                "killed": total.outcomes[outcomes.KILLED],
                "expired": total.outcomes[outcomes.EXPIRED] + dead[protocol.EXPIRED_REASON],
                "delivery_limit": dead[protocol.DELIVERY_LIMIT_REASON]})
        return rows


class _Sum:
    """A task's figures over the window, summed over workers."""

    __slots__ = ("buckets", "outcomes", "run", "wait", "ended", "seconds")

    def __init__(self, size: int) -> None:
        self.buckets: list[float] = []
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.run, self.wait = [0] * size, [0] * size
        self.ended, self.seconds = 0, 0.0


def _add_deltas(worker: _Worker, sums: dict[str, _Sum]) -> None:
    """Add what ``worker`` counted in the window to each task's sum."""
    if len(worker.history) < 2:
        return
    (first, base), (last, newest) = worker.history[0], worker.history[-1]
    buckets = worker.map.get("buckets")
    if not isinstance(buckets, list) or not all(isinstance(b, (int, float)) for b in buckets):
        return
    for task in worker.map.get("tasks") or ():  # it served none of some: 0 calls/s
        if isinstance(task, str) and task not in newest:
            total = sums.get(task) or sums.setdefault(task, _Sum(len(buckets) + 1))
            total.seconds = max(total.seconds, last - first)
    for task, figures in newest.items():
        if not isinstance(task, str) or not isinstance(figures, dict):
            continue
        was_there = base.get(task)
        old: dict[str, Any] = was_there if isinstance(was_there, dict) else {}
        total = sums.get(task)
        if total is None:
            total = sums[task] = _Sum(len(buckets) + 1)
        total.buckets = buckets
        total.seconds = max(total.seconds, last - first)
        ended = _diff(figures.get("outcomes"), old.get("outcomes"))
        total.outcomes.update(ended)
        total.ended += sum(n for o, n in ended.items() if o != outcomes.REQUEUED)
        for key, into in (("run", total.run), ("wait", total.wait)):
            new, was = figures.get(key), old.get(key) or []
            if isinstance(new, list) and len(new) == len(into):
                for i, count in enumerate(new):
                    into[i] += int(_number(count, 0) - _number(was[i] if i < len(was) else 0, 0))


def _diff(new: object, old: object) -> dict[str, int]:
    if not isinstance(new, dict):
        return {}
    was = old if isinstance(old, dict) else {}
    return {str(k): max(0, int(_number(v, 0) - _number(was.get(k), 0))) for k, v in new.items()}


def quantile(q: float, bounds: list[float], counts: list[int]) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, the last past every bound),
    interpolated within its bucket as Prometheus' ``histogram_quantile`` does; None if
    empty. Past the last bound it is that bound."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = 0.0 if i == 0 else float(bounds[i - 1])
            return round(low + (float(bounds[i]) - low) * (rank - seen) / count, 6)
        seen += count
    return float(bounds[-1])


def _worker_row(worker: _Worker, now: float) -> dict[str, Any]:
    m = worker.map
    interval = _number(m.get("interval"), protocol.FIGURES_INTERVAL)
    tasks = m.get("tasks")
    return {"worker": m["worker"], "host": m.get("host"), "pid": m.get("pid"),
            "version": m.get("version"), "busy": m.get("busy"),
            "concurrency": m.get("concurrency"), "stuck": m.get("stuck"),
            "uptime": m.get("uptime"), "tasks": len(tasks) if isinstance(tasks, list) else 0,
            "seen": round(now - worker.seen, 1),
            "stale": now - worker.seen > STALE_INTERVALS * interval}


def _calls(workers: Iterable[_Worker], now: float, now_ms: int) -> list[dict[str, Any]]:
    rows = []
    for worker in workers:
        since = now - worker.seen
        for call in worker.map.get("calls") or ():
            if isinstance(call, dict) and isinstance(call.get("correlation_id"), str):
                rows.append({
                    "task": call.get("task"), "correlation_id": call["correlation_id"],
                    "worker": worker.map["worker"], "state": call.get("state"),
                    "elapsed": round(_number(call.get("elapsed"), 0) + since, 1),
                    "deadline": round((_number(call.get("deadline"), now_ms) - now_ms) / 1000,
                                      1)})
    rows.sort(key=lambda row: -row["elapsed"])
    return rows[:MAX_CALLS]


def _failures(workers: Iterable[_Worker]) -> list[dict[str, Any]]:
    rows = [{**failure, "worker": worker.map["worker"]}
            for worker in workers for failure in worker.map.get("failures") or ()
            if isinstance(failure, dict)]
    rows.sort(key=lambda row: -_number(row.get("at"), 0))
    return rows[:MAX_FAILURES]


def _number(value: object, default: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else default  # type: ignore[return-value]
