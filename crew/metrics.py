"""Prometheus metrics of crew's clients and workers: the optional ``crew[metrics]`` extra.

Without ``prometheus_client`` this module still imports (:data:`AVAILABLE` is False) and
nothing in it but :data:`BUCKETS` may be used. With it, the metrics of every client and
worker of the process are one collector in prometheus_client's default registry,
registered on first use, so an application's own exporter shows them; :func:`serve`
exposes them on a port of their own (``--metrics-port``), :func:`exposition` for the
gateway's ``/metrics``.

A call's record costs a fraction of a microsecond: an append to a deque, counted into
buckets in batches (prometheus_client's own Counter and Histogram take a lock per number,
about 4 us per call here); the collector turns the counts into counters and histograms at
scrape time. Labels are ``task`` and ``outcome`` only (:mod:`crew.outcomes`), never a
correlation id or data; a process labels at most :data:`MAX_TASK_LABELS` task names (the
gateway's callers choose them), the rest under ``task="_other"``. Names and meanings are in
README, "Metrics and traces"; :mod:`crew.observing` calls these.

``prometheus_client`` is imported on first use (the first client or worker with metrics on,
:func:`serve`, :func:`exposition`), never by ``import crew``: it takes tens of milliseconds,
which a process without metrics should not pay. :data:`AVAILABLE` only finds it.
"""

from __future__ import annotations

import collections
import importlib.util
import threading
import weakref
from bisect import bisect_left
from typing import Any, Callable, Iterator

__all__ = ["AVAILABLE", "MAX_TASK_LABELS", "ClientMetrics", "WorkerMetrics", "exposition",
           "serve"]


def _installed() -> bool:
    """Whether prometheus_client is installed (found, not imported: it takes tens of ms)."""
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except ImportError:  # an import hook refused it
        return False


AVAILABLE = _installed()
#: Distinct task names a process labels; calls to others count under :data:`OTHER_TASK`.
MAX_TASK_LABELS = 1000
OTHER_TASK = "_other"
#: Seconds: crew calls take from half a millisecond to the 25-minute limit.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0, 300.0, 1500.0)
#: A series: a count per bucket (the last one past every bound), the sum, the count of events.
_SUM, _EVENTS = len(BUCKETS) + 1, len(BUCKETS) + 2
#: Events counted at once; until then they wait in a deque (a scrape counts them all).
_BATCH = 256


class _Series:
    """Events by label values, each with seconds in buckets (or none: counted only).

    An event is appended to a deque, which needs no lock (the deque's own methods are
    atomic), and the events are counted in batches of :data:`_BATCH` by a thread that finds
    the lock free (no thread ever waits for it to record), and at each scrape. A lock per
    event would have the job threads and the loop of a busy worker contend for it.
    """

    def __init__(self, what: str, counter: str, histogram: str, seconds: str,
                 labels: tuple[str, ...]) -> None:
        by = f", by {' and '.join(labels)}"
        self.counter, self.counter_help = counter, f"{what}{by}"
        self.histogram, self.histogram_help = histogram, f"Seconds {seconds}{by}"
        self.labels = labels
        self._events: collections.deque[tuple[tuple[str, ...], float | None]] = (
            collections.deque())
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._tasks: set[str] = set()

    def add(self, key: tuple[str, ...], seconds: float | None) -> None:
        """One event of ``key`` (task first), ``seconds`` long; any thread may call it."""
        events = self._events
        events.append((key, seconds))
        # Never waits: if another thread is counting, the events wait for the next batch.
        if len(events) >= _BATCH and self._lock.acquire(blocking=False):
            try:
                self._count_held()
            finally:
                self._lock.release()

    def _count(self) -> None:
        """Count every event appended so far into its series."""
        with self._lock:
            self._count_held()

    def _count_held(self) -> None:
        events, series_of = self._events, self._series
        for _ in range(len(events)):  # what others append meanwhile waits for the next
            key, seconds = events.popleft()
            series = series_of.get(key) or self._new(key)
            series[_EVENTS] += 1
            if seconds is not None:
                series[bisect_left(BUCKETS, seconds)] += 1
                series[_SUM] += seconds

    def _new(self, key: tuple[str, ...]) -> list[float]:
        """With the lock held: the series of a new ``key``, or of ``_other`` past the limit."""
        if key[0] not in self._tasks:
            if len(self._tasks) >= MAX_TASK_LABELS:  # not kept under its own key
                return self._series.setdefault((OTHER_TASK, *key[1:]), [0.0] * (_EVENTS + 1))
            self._tasks.add(key[0])
        return self._series.setdefault(key, [0.0] * (_EVENTS + 1))

    def families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        self._count()
        with self._lock:
            series = [(key, list(values)) for key, values in self._series.items()]
        if self.counter:
            counter = CounterMetricFamily(self.counter, self.counter_help, labels=self.labels)
            for key, values in series:
                counter.add_metric(key, values[_EVENTS])
            yield counter
        histogram = HistogramMetricFamily(self.histogram, self.histogram_help, labels=self.labels)
        for key, values in series:
            cumulative, buckets = 0.0, []
            for bound, count in zip(_bounds(), values[:_SUM], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            histogram.add_metric(key, buckets, values[_SUM])
        yield histogram


def _bounds() -> tuple[str, ...]:
    """The buckets' ``le`` labels, as prometheus_client writes them."""
    from prometheus_client.utils import floatToGoString
    return (*map(floatToGoString, BUCKETS), "+Inf")


class _Collector:
    """The process's crew metrics, collected at scrape time (on the scrape's thread: the
    workers' gauges are read with ``len()`` only, which any thread may do)."""

    def __init__(self) -> None:
        self.calls = _Series("Calls made", "crew_client_calls",
                             "crew_client_call_duration_seconds",
                             "from a call to its outcome", ("task", "outcome"))
        self.jobs = _Series("Calls served", "crew_worker_jobs",
                            "crew_worker_job_duration_seconds",
                            "from a job's start to its end", ("task", "outcome"))
        self.waits = _Series("", "", "crew_worker_queue_wait_seconds",
                             "from a call's publication to its job's start", ("task",))
        self.workers: weakref.WeakSet[WorkerMetrics] = weakref.WeakSet()
        self.reconnections = 0
        self.clients = False  # their families appear once a client records
        from prometheus_client import REGISTRY
        REGISTRY.register(self)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        if self.clients:
            yield from self.calls.families()
        workers = list(self.workers)
        if not workers:
            return
        yield from self.jobs.families()
        yield from self.waits.families()
        yield CounterMetricFamily("crew_worker_reconnections", "Broker connections (or task "
                                  "channels) lost and made again", value=self.reconnections)
        figures = [(*worker.gauges(), worker.slots) for worker in workers]
        for name, what, values in (
                ("crew_worker_running_jobs", "Calls being served (running, or waiting for a "
                 "job slot)", [serving for serving, _, _, _ in figures]),
                ("crew_worker_job_slots", "Jobs the workers may run at once (their "
                 "concurrency)", [slots for _, _, stopping, slots in figures if not stopping]),
                ("crew_worker_stuck_threads", "Job threads interrupted at a deadline or cancel "
                 "that have not returned", [stuck for _, stuck, _, _ in figures])):
            yield GaugeMetricFamily(name, what, value=sum(values))


_lock = threading.Lock()
_collector: list[_Collector] = []


def _the_collector() -> _Collector:
    """The process's one collector, registered the first time."""
    with _lock:
        if not _collector:
            _collector.append(_Collector())
        return _collector[0]


class ClientMetrics:
    """What a client records: ``crew_client_calls_total`` and
    ``crew_client_call_duration_seconds``, by task and outcome."""

    def __init__(self) -> None:
        collector = _the_collector()
        collector.clients = True
        self._calls = collector.calls.add

    def call_ended(self, task: str, outcome: str, seconds: float) -> None:
        self._calls((task, outcome), seconds)


class WorkerMetrics:
    """What a worker records. ``gauges()`` returns (calls being served, stuck job threads,
    whether it stops) and may be called from any thread; ``slots`` is its concurrency."""

    def __init__(self, gauges: Callable[[], tuple[int, int, bool]], slots: int) -> None:
        self._collector = _the_collector()
        self._jobs, self._waits = self._collector.jobs.add, self._collector.waits.add
        self.gauges, self.slots = gauges, slots
        self._collector.workers.add(self)

    def job_started(self, task: str, waited: float | None) -> None:
        """A job of ``task`` started, ``waited`` seconds after its call was published."""
        if waited is not None:
            self._waits((task,), waited)

    def job_ended(self, task: str, outcome: str, seconds: float | None) -> None:
        """A call ended; ``seconds`` its job ran (None: it never started)."""
        self._jobs((task, outcome), seconds)

    def reconnecting(self) -> None:
        with _lock:
            self._collector.reconnections += 1


def serve(port: int, addr: str = "") -> Any:
    """Serve ``/metrics`` on ``port`` (all interfaces unless ``addr``) in a daemon thread;
    return the server (``shutdown()`` stops it). Raises ``OSError`` if the port is taken."""
    import prometheus_client
    server, _thread = prometheus_client.start_http_server(port, addr or "0.0.0.0")
    return server


def exposition() -> tuple[bytes, str]:
    """Every metric of the default registry in the text format, and its content type."""
    import prometheus_client
    return prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
