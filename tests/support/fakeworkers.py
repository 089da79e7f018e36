"""Fake workers for the dashboard's tests: synthetic *figures* messages (docs/PROTOCOL.md,
section 13) from N workers serving M tasks, published on the ``crew.figures`` exchange with
plain pika, as real workers publish them, but with no worker, queue or call behind them.

Each fake worker starts with a few minutes of history and serves more calls between two
messages: its cumulative outcome counts and run and wait histograms only grow; it has calls
running (some for many seconds, so they stay across messages) and waiting, and its newest
failures (tracebacks of real exceptions). A run histogram counts the calls whose job ran
(ok, remote_error, killed); so does the wait histogram (time from receipt to start).
Expired, cancelled and requeued calls did not run. Everything comes from a seeded
``random.Random``, so two fleets of the same seed tell the same story.

``with FakeFleet(url, workers=30, tasks=300) as fleet:`` publishes every ``interval``
seconds from a thread, each worker at its own moment within the interval, until the block
ends; then each says it stops (``stopping``), unless ``goodbye=False``.
"""

# longer than 300 lines because the contract's checker (shape_problems) sits at the end,
# beside the fake that follows it.
from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
import threading
import time
from typing import Any

import pika

from crew import codec, metrics, outcomes, protocol
from crew.exceptions import JobKilled
from crew.figures import KEEP_FAILURES, TRACEBACK_CHARS

#: The figures exchange (fanout, durable, no arguments) and the messages' properties: crew's.
FIGURES_EXCHANGE = protocol.FIGURES_EXCHANGE
FIGURES_TYPE = protocol.FIGURES_TYPE
EXPIRATION = str(protocol.seconds_to_ms(5 * protocol.FIGURES_INTERVAL))
#: Upper bounds (seconds) of the histograms' buckets, the workers' own; +Inf is implicit.
BUCKETS = metrics.BUCKETS
OUTCOMES = outcomes.WORKER_OUTCOMES
RAN = ("ok", "remote_error", "killed")
MAX_FAILURES = KEEP_FAILURES
MAX_TRACEBACK = TRACEBACK_CHARS
_AREAS = ("billing", "mail", "search", "images", "reports", "auth", "sync", "geo")
_VERBS = ("charge", "send", "index", "resize", "render", "check", "pull", "lookup")
_SAMPLES = 2  # calls drawn per task and step; the step's other calls follow them


_KINDS: dict[str, type[BaseException]] = {
    "ValueError": ValueError, "KeyError": KeyError, "ConnectionError": ConnectionError,
    "JobKilled": JobKilled}


def _fail(kind: str, detail: str, depth: int = 3) -> None:
    """Raise a ``kind`` a few frames down, as a task's code would."""
    if depth:
        _fail(kind, detail, depth - 1)
    raise _KINDS[kind](detail)


@functools.lru_cache(maxsize=4096)
def _failure_text(kind: str, detail: str) -> tuple[str, str]:
    """(message, traceback) of a real exception of ``kind`` raised a few frames down
    (remembered: formatting tracebacks is most of a fleet's work otherwise)."""
    try:
        _fail(kind, detail)
    except tuple(_KINDS.values()) as exc:
        envelope = codec.error_envelope(exc)
        return envelope["message"], envelope["traceback"][:MAX_TRACEBACK]
    raise AssertionError("_fail did not raise")


class _Task:
    """One task as the fleet sees it: how long it runs and how often it fails."""

    def __init__(self, rng: random.Random, index: int) -> None:
        self.name = f"fake.{_AREAS[index % len(_AREAS)]}.{_VERBS[index // 8 % 8]}{index:03d}"
        self.typical = 10 ** rng.uniform(-2.3, 0.5)  # 5 ms to 3 s
        self.fail_rate = rng.choice((0.0, 0.0, 0.0, 0.01, 0.05, 0.2))
        self.rate = rng.uniform(0.05, 3.0)  # calls per second, per worker

        odds = (("remote_error", self.fail_rate), ("killed", 0.003), ("expired", 0.005),
                ("cancelled", 0.003), ("requeued", 0.002))
        self._below = list(itertools.accumulate(p for _, p in odds))
        self._outcomes = [outcome for outcome, _ in odds] + ["ok"]

    def outcome(self, rng: random.Random) -> str:
        return self._outcomes[bisect.bisect_right(self._below, rng.random())]


class FakeWorker:
    """A worker's figures and calls, advanced by :meth:`step`, told by :meth:`message`."""

    def __init__(self, rng: random.Random, index: int, tasks: list[_Task], now: float,
                 history: float) -> None:
        self.rng, self.tasks = rng, tasks
        self.id = f"{rng.getrandbits(128):032x}"
        self.host, self.pid = f"fake-host-{index // 4:02d}", 1000 + index
        self.concurrency = rng.choice((2, 4, 8))
        self.started = now - history - rng.uniform(0, 3600)
        self.figures: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self.running: list[dict[str, Any]] = []
        self.waiting: list[dict[str, Any]] = []
        self.stuck = 1 if index % 10 == 9 else 0
        self.calls_made = 0
        self.step(history, now)

    def step(self, seconds: float, now: float) -> None:
        """Serve ``seconds`` more of calls, up to ``now`` (epoch seconds)."""
        for task in self.tasks:
            count = int(task.rate * seconds + self.rng.random())
            if count:
                self._serve(task, count, now, seconds)
        self._churn_calls(now)

    def _serve(self, task: _Task, count: int, now: float, seconds: float) -> None:
        figures = self.figures.setdefault(task.name, {
            "outcomes": {}, "run": [0] * (len(BUCKETS) + 1), "run_sum": 0.0,
            "wait": [0] * (len(BUCKETS) + 1), "wait_sum": 0.0})
        samples = min(count, _SAMPLES)
        for i in range(samples):
            weight = count // samples + (i < count % samples)
            outcome = task.outcome(self.rng)
            outcomes = figures["outcomes"]
            outcomes[outcome] = outcomes.get(outcome, 0) + weight
            if outcome in RAN:
                run = task.typical * math.exp(self.rng.gauss(0, 0.6))
                wait = 0.002 * math.exp(self.rng.gauss(0, 1.5))
                figures["run"][bisect.bisect_left(BUCKETS, run)] += weight
                figures["run_sum"] += run * weight
                figures["wait"][bisect.bisect_left(BUCKETS, wait)] += weight
                figures["wait_sum"] += wait * weight
            if outcome in ("remote_error", "killed", "expired"):
                self._failed(task, outcome, now - self.rng.uniform(0, min(seconds, 60)))

    def _failed(self, task: _Task, outcome: str, at: float) -> None:
        if outcome == "expired":
            kind, message, trace = "ExpirationError", "expired before it started", ""
        else:
            kind = "JobKilled" if outcome == "killed" else self.rng.choice(
                ("ValueError", "KeyError", "ConnectionError"))
            message, trace = _failure_text(kind, f"{task.name}: item {self.rng.randrange(8)}")
        self.failures.append({"task": task.name, "correlation_id": self._call_id(),
                              "at": int(at * 1000), "outcome": outcome, "type": kind,
                              "message": message, "traceback": trace})
        self.failures.sort(key=lambda failure: failure["at"])  # newest last
        del self.failures[:-MAX_FAILURES]

    def _call_id(self) -> str:
        self.calls_made += 1
        return f"{self.id[:16]}.{self.calls_made}"

    def _churn_calls(self, now: float) -> None:
        """End the calls whose time is up; start waiting ones and new ones in free slots."""
        self.running = [call for call in self.running if call["ends"] > now]
        target = self.rng.randint(0, self.concurrency)
        while len(self.running) < target:
            call = self.waiting.pop(0) if self.waiting else self._new_call(now)
            call["state"] = "running"
            self.running.append(call)
        if len(self.running) == self.concurrency and self.rng.random() < 0.5:
            self.waiting.append(self._new_call(now))
        del self.waiting[3:]

    def _new_call(self, now: float) -> dict[str, Any]:
        task = self.rng.choice(self.tasks)
        seconds = min(task.typical * self.rng.lognormvariate(2, 1), 40.0)
        return {"task": task.name, "correlation_id": self._call_id(),
                "caller": f"amq.gen-{self.rng.getrandbits(64):016x}", "state": "waiting",
                "received": now, "ends": now + seconds, "deadline": now + 60.0}

    def message(self, now: float, interval: float, stopping: bool = False) -> dict[str, Any]:
        """The figures message at ``now`` (epoch seconds): presence map and figures."""
        calls = [{"task": c["task"], "correlation_id": c["correlation_id"],
                  "caller": c["caller"], "state": c["state"],
                  "received": int(c["received"] * 1000),
                  "elapsed": round(now - c["received"], 3),
                  "deadline": int(c["deadline"] * 1000)}
                 for c in ([] if stopping else self.running + self.waiting)]
        return {
            "v": 1, "worker": self.id, "host": self.host, "version": protocol.VERSION,
            "tasks": sorted(task.name for task in self.tasks), "queue_type": "classic",
            "max_priority": 10, "concurrency": self.concurrency, "max_stuck": 4,
            "pid": self.pid, "started": int(self.started * 1000),
            "uptime": round(now - self.started, 3), "at": int(now * 1000),
            "busy": sum(c["state"] == "running" for c in calls),
            "waiting": sum(c["state"] == "waiting" for c in calls), "stuck": self.stuck,
            "calls": calls, "interval": interval, "stopping": stopping,
            "buckets": list(BUCKETS), "figures": self.figures,
            "failures": list(self.failures)}


class FakeFleet:
    """``workers`` fake workers serving ``tasks`` tasks (each task served by
    ``workers_per_task`` of them, round the fleet; None: by every worker), publishing their
    figures messages to ``url`` every ``interval`` seconds from a thread while the fleet is
    entered. Entering returns once each worker has published once; leaving raises what
    went wrong in the thread, if anything."""

    def __init__(self, url: str, workers: int = 3, tasks: int = 5,
                 interval: float = protocol.FIGURES_INTERVAL,
                 workers_per_task: int | None = None, seed: int = 0, history: float = 600.0,
                 goodbye: bool = True) -> None:
        rng = random.Random(seed)
        self.url, self.interval, self.goodbye = url, interval, goodbye
        self.tasks = [_Task(rng, i) for i in range(tasks)]
        spread = workers if workers_per_task is None else min(workers_per_task, workers)
        served: list[list[_Task]] = [[] for _ in range(workers)]
        for i, task in enumerate(self.tasks):
            for k in range(spread):
                served[(i + k) % workers].append(task)
        now = time.time()
        self.workers = [FakeWorker(random.Random(rng.random()), i, served[i] or self.tasks[:1],
                                   now, history) for i in range(workers)]
        self.published = 0  # messages sent so far
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fake-workers", daemon=True)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def wait_published(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` messages in all have been published."""
        with self._changed:
            if not self._changed.wait_for(
                    lambda: self.published >= count or self._error is not None, timeout):
                raise TimeoutError(f"{self.published} of {count} figures messages published")
        if self._error is not None:
            raise RuntimeError("the fake workers' publisher failed") from self._error

    def __enter__(self) -> FakeFleet:
        self._thread.start()
        try:
            self.wait_published(len(self.workers), max(30.0, 3 * self.interval))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._thread.is_alive():
            raise RuntimeError("the fake workers' publisher did not stop")
        if self._error is not None and exc_info[0] is None:
            raise RuntimeError("the fake workers' publisher failed") from self._error

    def _run(self) -> None:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.url))
            try:
                channel = connection.channel()
                channel.exchange_declare(FIGURES_EXCHANGE, "fanout", durable=True)
                self._publish_rounds(channel)
            finally:
                connection.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _publish_rounds(self, channel: Any) -> None:
        gap = self.interval / len(self.workers)
        last = {worker.id: time.time() for worker in self.workers}
        while not self._stop.is_set():
            for worker in self.workers:
                now = time.time()
                worker.step(now - last[worker.id], now)
                last[worker.id] = now
                self._publish(channel, worker.message(now, self.interval))
                if self._stop.wait(gap):
                    break
        if self.goodbye:
            for worker in self.workers:
                self._publish(channel, worker.message(time.time(), self.interval, True))

    def _publish(self, channel: Any, message: dict[str, Any]) -> None:
        channel.basic_publish(FIGURES_EXCHANGE, "", codec.serialize(message),
                              pika.BasicProperties(type=FIGURES_TYPE,
                                                   content_type=protocol.MSGPACK,
                                                   delivery_mode=1, expiration=EXPIRATION))
        with self._changed:
            self.published += 1
            self._changed.notify_all()


# The figures message of the contract (PROTOCOL section 13), key by key: for checking the
# fake's messages, and real workers' too.
_PRESENCE_KEYS = {"v": int, "worker": str, "host": str, "version": str, "tasks": list,
                  "queue_type": str, "max_priority": (int, type(None)), "concurrency": int,
                  "max_stuck": int, "pid": int, "started": int, "uptime": float, "at": int,
                  "busy": int, "waiting": int, "stuck": int, "calls": list}
_FIGURES_KEYS = {"interval": float, "stopping": bool, "buckets": list, "figures": dict,
                 "failures": list}
_CALL_KEYS = {"task": str, "correlation_id": str, "caller": str, "state": str,
              "received": int, "elapsed": float, "deadline": int}
_FAILURE_KEYS = {"task": str, "correlation_id": str, "at": int, "outcome": str, "type": str,
                 "message": str, "traceback": str}


def _keys(where: str, value: Any, keys: dict[str, Any]) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: not a map"]
    return [f"{where}.{key}: {value.get(key)!r} is not {kind}" for key, kind in keys.items()
            if not isinstance(value.get(key), kind)
            or (kind in (int, float) and isinstance(value.get(key), bool))]


def shape_problems(message: Any) -> list[str]:
    """What in a decoded figures message does not follow the contract (empty: nothing)."""
    problems = _keys("message", message, {**_PRESENCE_KEYS, **_FIGURES_KEYS})
    if problems:
        return problems
    for i, call in enumerate(message["calls"]):
        problems += _keys(f"calls[{i}]", call, _CALL_KEYS)
    width = len(message["buckets"]) + 1
    for task, figures in message["figures"].items():
        if set(figures) != {"outcomes", "run", "run_sum", "wait", "wait_sum"}:
            problems.append(f"figures[{task}]: keys {sorted(figures)}")
        elif not set(figures["outcomes"]) <= set(OUTCOMES):
            problems.append(f"figures[{task}].outcomes: {sorted(figures['outcomes'])}")
        elif len(figures["run"]) != width or len(figures["wait"]) != width:
            problems.append(f"figures[{task}]: histograms not {width} buckets long")
    if len(message["failures"]) > MAX_FAILURES:
        problems.append(f"failures: {len(message['failures'])} of them")
    for i, failure in enumerate(message["failures"]):
        problems += _keys(f"failures[{i}]", failure, _FAILURE_KEYS)
        if failure.get("outcome") not in ("remote_error", "killed", "expired"):
            problems.append(f"failures[{i}].outcome: {failure.get('outcome')!r}")
        if len(failure.get("traceback", "")) > MAX_TRACEBACK:
            problems.append(f"failures[{i}].traceback: over {MAX_TRACEBACK} characters")
    return problems
