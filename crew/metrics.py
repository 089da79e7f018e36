"""Prometheus metrics of crew's clients and workers: the optional ``crew[metrics]`` extra.

Without ``prometheus_client`` this module still imports (:data:`AVAILABLE` is False) and
nothing in it may be used. With it, the metrics live in prometheus_client's default
registry, made once per process on first use and shared by every client and worker of the
process, so an application's own exporter shows them; :func:`serve` exposes them on a port
of their own (``--metrics-port``), :func:`exposition` for the gateway's ``/metrics``.

Labels are ``task`` and ``outcome`` only (:mod:`crew.outcomes`), never a correlation id or
data: a client counts at most :data:`MAX_TASK_LABELS` task names (the gateway's callers
choose them), the rest under ``task="_other"``. Each labelled child is looked up once and
kept in a dict: ``labels()`` on every call would cost more than the rest of the record.
Names and meanings are in README, "Metrics and traces"; :mod:`crew.observing` calls these.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterator

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the extra is not installed: crew runs without metrics
    prometheus_client = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "MAX_TASK_LABELS", "ClientMetrics", "WorkerMetrics", "exposition",
           "serve"]

AVAILABLE = prometheus_client is not None
#: Distinct task names a process labels; calls to others count under :data:`OTHER_TASK`.
MAX_TASK_LABELS = 1000
OTHER_TASK = "_other"
#: Seconds: crew calls take from half a millisecond to the 25-minute limit.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0, 300.0, 1500.0)

_lock = threading.Lock()
_made: dict[str, Any] = {}

Record = tuple[Callable[[], None], Callable[[float], None]]


class _Family:
    """A counter and a histogram labelled by task and outcome, with their children cached."""

    def __init__(self, counter: str, histogram: str, what: str) -> None:
        labels = ("task", "outcome")
        self.counter = prometheus_client.Counter(counter, f"{what}, by task and outcome", labels)
        self.histogram = prometheus_client.Histogram(
            histogram, f"Seconds {what.lower()} took, by task and outcome", labels,
            buckets=BUCKETS)
        self.children: dict[tuple[str, str], Record] = {}
        self.tasks: set[str] = set()

    def record(self, task: str, outcome: str) -> Record:
        """The counter's ``inc`` and the histogram's ``observe`` for these labels."""
        found = self.children.get((task, outcome))
        if found is None:
            with _lock:
                label = task
                if task not in self.tasks:
                    if len(self.tasks) < MAX_TASK_LABELS:
                        self.tasks.add(task)
                    else:  # not cached: a name past the limit must not grow the dict
                        label = OTHER_TASK
                found = (self.counter.labels(label, outcome).inc,
                         self.histogram.labels(label, outcome).observe)
                if label == task:
                    self.children[task, outcome] = found
        return found


def _once(name: str, make: Callable[[], Any]) -> Any:
    """The process's one ``name`` object, made by ``make()`` the first time."""
    with _lock:
        if name not in _made:
            _made[name] = make()
        return _made[name]


class ClientMetrics:
    """What a client records: ``crew_client_calls_total`` and
    ``crew_client_call_duration_seconds``, by task and outcome."""

    def __init__(self) -> None:
        self._calls: _Family = _once("client", lambda: _Family(
            "crew_client_calls", "crew_client_call_duration_seconds", "Calls made"))

    def call_ended(self, task: str, outcome: str, seconds: float) -> None:
        count, observe = self._calls.record(task, outcome)
        count()
        observe(seconds)


class _Gauges:
    """Reads the gauges of every live :class:`WorkerMetrics` at scrape time (on the scrape's
    thread: the figures are read with ``len()`` only, which any thread may do)."""

    def __init__(self) -> None:
        self.workers: weakref.WeakSet[WorkerMetrics] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        running = stuck = slots = 0
        for worker in list(self.workers):
            serving, stuck_now, stopping = worker.gauges()
            running, stuck = running + serving, stuck + stuck_now
            slots += 0 if stopping else worker.slots
        yield GaugeMetricFamily("crew_worker_running_jobs",
                                "Calls being served (running, or waiting for a job slot)",
                                value=running)
        yield GaugeMetricFamily("crew_worker_job_slots", "Jobs the workers may run at once "
                                "(their concurrency)", value=slots)
        yield GaugeMetricFamily("crew_worker_stuck_threads", "Job threads interrupted at a "
                                "deadline or cancel that have not returned", value=stuck)


class _WorkerFamilies:
    def __init__(self) -> None:
        self.jobs = _Family("crew_worker_jobs", "crew_worker_job_duration_seconds", "Jobs run")
        self.queue_wait = prometheus_client.Histogram(
            "crew_worker_queue_wait_seconds", "Seconds from a call's publication to the start "
            "of its job, by task (clocks of client and worker compared)", ("task",),
            buckets=BUCKETS)
        self.reconnections = prometheus_client.Counter(
            "crew_worker_reconnections", "Broker connections (or task channels) lost and made "
            "again")
        self.gauges = _Gauges()
        prometheus_client.REGISTRY.register(self.gauges)


class WorkerMetrics:
    """What a worker records. ``gauges()`` returns (calls being served, stuck job threads,
    whether it stops) and may be called from any thread; ``slots`` is its concurrency."""

    def __init__(self, gauges: Callable[[], tuple[int, int, bool]], slots: int) -> None:
        self._families: _WorkerFamilies = _once("worker", _WorkerFamilies)
        self._families.gauges.workers.add(self)
        self.gauges, self.slots = gauges, slots
        self._waits: dict[str, Callable[[float], None]] = {}

    def job_started(self, task: str, waited: float | None) -> None:
        """A job of ``task`` started, ``waited`` seconds after its call was published."""
        if waited is None:
            return
        observe = self._waits.get(task)
        if observe is None:
            observe = self._waits[task] = self._families.queue_wait.labels(task).observe
        observe(waited)

    def job_ended(self, task: str, outcome: str, seconds: float | None) -> None:
        """A call ended; ``seconds`` its job ran (None: it never started)."""
        count, observe = self._families.jobs.record(task, outcome)
        count()
        if seconds is not None:
            observe(seconds)

    def reconnecting(self) -> None:
        self._families.reconnections.inc()


def serve(port: int, addr: str = "") -> Any:
    """Serve ``/metrics`` on ``port`` (all interfaces unless ``addr``) in a daemon thread;
    return the server (``shutdown()`` stops it). Raises ``OSError`` if the port is taken."""
    server, _thread = prometheus_client.start_http_server(port, addr or "0.0.0.0")
    return server


def exposition() -> tuple[bytes, str]:
    """Every metric of the default registry in the text format, and its content type."""
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
