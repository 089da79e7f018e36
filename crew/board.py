"""What a dashboard shows, made from the figures workers publish (docs/PROTOCOL.md, section
13): the tasks, the workers, the calls running now and the recent failures.

A :class:`Board` holds nothing but what the workers sent in the last minute or so: each
worker's latest map, and what the workers counted over the last :data:`WINDOW` seconds, in
slots of :data:`SLOT` seconds. Workers count from their start; what one counted between two
of its messages goes into the newest slot, added up over workers, and a slot that leaves
the window is dropped: the memory and the work of a view depend on the tasks, not on the
messages. A dashboard that restarts shows everything again after two messages of each
worker. It does no I/O: :mod:`crew.watcher` feeds it, :mod:`crew.dashboard` serves
:meth:`Board.view`.

Anyone who may publish to the vhost may publish figures: a map that is not one is ignored,
and what a board keeps is bounded (:data:`MAX_WORKERS`, :data:`MAX_TASKS`).
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping

from . import protocol, validation
from .windows import Figures, Sum, checked, checked_buckets, growth

__all__ = ["MAX_CALLS", "MAX_FAILURES", "WINDOW", "Board"]

#: Seconds the rates and percentiles are taken over, kept as slots of SLOT seconds.
WINDOW = 60.0
SLOT = 2.0
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
    """One worker's latest map, and its figures in it (checked)."""

    __slots__ = ("map", "seen", "figures", "raw")

    def __init__(self) -> None:
        self.map: dict[str, Any] = {}
        self.seen = 0.0
        self.figures: Figures | None = None  # None: no message heard yet
        self.raw: dict[str, Any] | None = None  # the figures as they came, for the next


class Board:
    """The workers' figures over the last :data:`WINDOW` seconds, and the calls dead-lettered
    by the broker (expired in their queue) that the dashboard counted."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._workers: dict[str, _Worker] = {}
        #: Calls the broker dead-lettered, per slot: (its start, (task, reason) -> count).
        self._dead: collections.deque[tuple[float, collections.Counter[tuple[str, str]]]] = (
            collections.deque())
        #: Every task a worker served, and when it was last heard of.
        self._known: dict[str, float] = {}
        #: What workers counted, per slot: (the slot's start, task -> sum), oldest first.
        self._slots: collections.deque[tuple[float, dict[str, Sum]]] = collections.deque()
        #: From when the slots count (None: nothing counted yet).
        self._since: float | None = None

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
            uptime = _number(figures.get("uptime"), -1)
            if 0 <= uptime < self.window:  # it started recently, from zero
                worker.figures, worker.seen = {}, now - uptime
        for task in _tasks_of(figures):
            if task in self._known or len(self._known) < MAX_TASKS:
                self._known[task] = now
        buckets = checked_buckets(figures.get("buckets"))
        raw = figures.get("figures")
        newest = checked(raw, len(buckets) + 1 if buckets else 0, worker.raw, worker.figures)
        if worker.figures is not None:
            self._count(growth(worker.figures, newest), buckets, worker.seen, now)
        worker.map, worker.seen, worker.figures = figures, now, newest
        worker.raw = raw if isinstance(raw, dict) else None
        return True

    def _count(self, grown: Figures, buckets: tuple[float, ...] | None, since: float,
               now: float) -> None:
        """Add what a worker counted from ``since`` until ``now`` to the newest slot."""
        if self._since is None:
            self._since = since
        if not self._slots or now >= self._slots[-1][0] + SLOT:
            self._slots.append((now, {}))
        slot = self._slots[-1][1]
        for task, counted in grown.items():
            total = slot.get(task) or slot.setdefault(task, Sum())
            total.add(counted, buckets)

    def dead_lettered(self, task: str, reason: str, now: float) -> None:
        """The broker dead-lettered a call of ``task`` (``reason``: expired, delivery_limit)."""
        if not self._dead or now >= self._dead[-1][0] + SLOT:
            self._dead.append((now, collections.Counter()))
        counts = self._dead[-1][1]
        if (task, reason) in counts or len(counts) < MAX_TASKS:
            counts[task, reason] += 1

    def tasks(self) -> list[str]:
        """Every task a live worker serves, a worker served in the last KEEP_TASKS seconds,
        or that had calls dead-lettered in the window, by name."""
        names = set(self._known)
        for _start, counts in self._dead:
            names.update(task for task, _reason in counts)
        for worker in self._workers.values():
            names.update(_tasks_of(worker.map))
        return sorted(names)[:MAX_TASKS]

    def queue_gone(self, task: str) -> None:
        """``task``'s queue does not exist (any more): list it no more once no live worker
        serves it."""
        self._known.pop(task, None)

    def find_call(self, correlation_id: str) -> dict[str, Any] | None:
        """The call ``correlation_id`` as a live worker last said it serves it, or None."""
        for worker in self._workers.values():
            for call in _list(worker.map.get("calls")):
                if isinstance(call, dict) and call.get("correlation_id") == correlation_id:
                    return call
        return None

    def forget_old(self, now: float) -> None:
        """Forget workers unheard of for FORGET_AFTER seconds, and old dead letters."""
        for name in [n for n, w in self._workers.items() if now - w.seen > FORGET_AFTER]:
            del self._workers[name]
        for task in [t for t, seen in self._known.items() if now - seen > KEEP_TASKS]:
            del self._known[task]
        # A slot holds what was counted from its start on, of the SLOT seconds before each
        # count: one that started at the window's start counts from before it.
        while self._slots and self._slots[0][0] <= now - self.window:
            self._slots.popleft()
        while self._dead and self._dead[0][0] <= now - self.window:
            self._dead.popleft()

    def view(self, now: float, now_ms: int,
             queues: Mapping[str, tuple[int, int] | None]) -> dict[str, Any]:
        """What the page shows (README, "The dashboard"), at ``now`` (monotonic) and
        ``now_ms`` (epoch ms); ``queues``: each task queue's (messages, consumers), None
        for a queue that does not exist (tasks missing there: not known)."""
        self.forget_old(now)
        workers = sorted(self._workers.values(), key=lambda w: (
            _text(w.map.get("host"), 255), _number(w.map.get("pid"), 0)))
        return {"window": self.window,
                "tasks": self._task_rows(now, workers, queues),
                "workers": [_worker_row(w, now) for w in workers],
                "calls": _calls(workers, now, now_ms),
                "failures": _failures(workers)}

    def _task_rows(self, now: float, workers: list[_Worker],
                   queues: Mapping[str, tuple[int, int] | None]) -> list[dict[str, Any]]:
        serving: collections.Counter[str] = collections.Counter()
        for worker in workers:
            serving.update(_tasks_of(worker.map))
        sums: dict[str, Sum] = {}
        for _start, slot in self._slots:
            for task, counted in slot.items():
                total = sums.get(task) or sums.setdefault(task, Sum())
                total.add((counted.outcomes, counted.run, counted.wait), counted.buckets)
        seconds = 0.0 if self._since is None else min(self.window, now - self._since)
        dead: collections.Counter[tuple[str, str]] = collections.Counter()
        for _start, lettered in self._dead:
            dead.update(lettered)
        rows = []
        for task in self.tasks():
            total = sums.get(task) or Sum()
            total.seconds = seconds
            counts = queues.get(task)
            row = {"task": task, "messages": counts[0] if counts else None,
                   "consumers": counts[1] if counts else None, "workers": serving[task],
                   **total.figures(),
                   "delivery_limit": dead[task, protocol.DELIVERY_LIMIT_REASON]}
            row["expired"] += dead[task, protocol.EXPIRED_REASON]
            rows.append(row)
        return rows


def _worker_row(worker: _Worker, now: float) -> dict[str, Any]:
    m = worker.map
    interval = _number(m.get("interval"), protocol.FIGURES_INTERVAL)
    tasks = m.get("tasks")
    return {"worker": m["worker"][:64], "host": _text(m.get("host"), 255),
            "pid": _number(m.get("pid"), 0), "version": _text(m.get("version"), 50),
            "busy": _number(m.get("busy"), 0), "concurrency": _number(m.get("concurrency"), 0),
            "stuck": _number(m.get("stuck"), 0), "uptime": _number(m.get("uptime"), 0),
            "tasks": len(tasks) if isinstance(tasks, list) else 0,
            "seen": round(now - worker.seen, 1),
            "stale": now - worker.seen > STALE_INTERVALS * interval}


def _calls(workers: Iterable[_Worker], now: float, now_ms: int) -> list[dict[str, Any]]:
    rows = []
    for worker in workers:
        since = now - worker.seen
        for call in _list(worker.map.get("calls")):
            if isinstance(call, dict) and isinstance(call.get("correlation_id"), str):
                rows.append({
                    "task": _text(call.get("task"), 200),
                    "correlation_id": call["correlation_id"][:255],
                    "worker": worker.map["worker"], "state": _text(call.get("state"), 20),
                    "elapsed": round(_number(call.get("elapsed"), 0) + since, 1),
                    "deadline": round((_number(call.get("deadline"), now_ms) - now_ms) / 1000,
                                      1)})
    rows.sort(key=lambda row: -row["elapsed"])
    return rows[:MAX_CALLS]


#: The failure fields a view shows, cut to what a worker sends (crew/figures.py).
_FAILURE_TEXT = {"task": 200, "correlation_id": 255, "outcome": 50, "type": 200,
                 "message": 1000, "traceback": 4000}


def _failures(workers: Iterable[_Worker]) -> list[dict[str, Any]]:
    rows = [{**{key: _text(failure.get(key), size) for key, size in _FAILURE_TEXT.items()},
             "at": _number(failure.get("at"), 0), "worker": worker.map["worker"]}
            for worker in workers for failure in _list(worker.map.get("failures"))
            if isinstance(failure, dict)]
    rows.sort(key=lambda row: -row["at"])
    return rows[:MAX_FAILURES]


def _text(value: object, size: int) -> str:
    return value[-size:] if isinstance(value, str) else ""


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _tasks_of(figures: dict[str, Any]) -> list[str]:
    """The tasks a map says its worker serves (a list of names; anything else: none)."""
    tasks = figures.get("tasks")
    return [t for t in tasks if isinstance(t, str)] if isinstance(tasks, list) else []


def _number(value: object, default: float) -> float:
    return value if validation.is_number(value) else default  # type: ignore[return-value]
