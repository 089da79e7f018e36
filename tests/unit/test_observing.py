"""Outcome names, and when metrics and traces are on (crew.outcomes, crew.observing); the
figures themselves are checked against the broker (tests/broker/test_metrics.py,
test_traces.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from crew import (CallError, ConnectionLostError, DecodeError, DeliveryLimitError,
                  ExpirationError, RemoteError, TimeoutError, UnknownTaskError, metrics,
                  observing, outcomes, protocol)
from crew.pending import outcome
from pika.spec import BasicProperties


@pytest.mark.parametrize("error, expected", [
    (None, "ok"), (RemoteError("ValueError", "boom"), "remote_error"),
    (ExpirationError("x"), "expired"), (TimeoutError("x"), "timeout"),
    (TimeoutError("x", killed=True), "killed"), (UnknownTaskError("t"), "unknown_task"),
    (ConnectionLostError("x"), "connection_lost"), (asyncio.CancelledError(), "cancelled"),
    (DeliveryLimitError("t", 6), "delivery_limit"), (DecodeError("x"), "codec_error"),
    (CallError("returned"), "error"), (KeyError("a bug"), "error"),
])
def test_every_way_a_call_ends_has_one_outcome(error, expected):
    assert outcomes.of_exception(error) == expected
    assert expected in outcomes.CLIENT_OUTCOMES


def test_a_kill_reply_is_a_killed_timeout_error():
    props = BasicProperties(content_type=protocol.JSON,
                            headers={protocol.STATUS_HEADER: protocol.STATUS_TIMEOUT})
    error = outcome(props, b'{"type": "JobKilled", "message": "late", "traceback": ""}')
    assert isinstance(error, TimeoutError) and error.killed
    assert not TimeoutError("no answer").killed


@pytest.mark.parametrize("status, expected", [
    (protocol.STATUS_OK, "ok"), (protocol.STATUS_ERROR, "remote_error"),
    (protocol.STATUS_TIMEOUT, "killed"), (protocol.STATUS_EXPIRED, "expired"),
    (outcomes.CANCELLED, "cancelled"), (outcomes.REQUEUED, "requeued"),
])
def test_every_reply_status_has_one_worker_outcome(status, expected):
    assert outcomes.of_status(status) == expected
    assert expected in outcomes.WORKER_OUTCOMES


@pytest.mark.parametrize("env", ["0", "false", "No", "off"])
def test_the_environment_turns_metrics_and_traces_off(monkeypatch, env):
    monkeypatch.setenv(observing.METRICS_ENV, env)
    monkeypatch.setenv(observing.TRACES_ENV, env)
    assert observing.for_client(None, None) is None
    assert observing.for_worker(None, None, lambda: (0, 0, False), 1) is None
    assert observing.for_client(True, None) is not None  # asked for: on all the same


def test_on_by_default_when_installed_and_off_when_told(monkeypatch):
    monkeypatch.delenv(observing.METRICS_ENV, raising=False)
    monkeypatch.delenv(observing.TRACES_ENV, raising=False)
    on = observing.for_client(None, None)
    assert on is not None and on._metrics is not None and on._tracing is not None
    assert observing.for_client(False, False) is None
    only_traces = observing.for_client(False, None)
    assert only_traces is not None and only_traces._metrics is None


def test_a_switch_that_is_neither_a_bool_nor_a_tracer_provider_is_refused():
    with pytest.raises(TypeError, match="metrics= takes None, True or False, not str"):
        observing.for_client("no", None)
    with pytest.raises(TypeError, match="traces="):
        observing.for_client(None, 1)


def test_events_from_many_threads_are_all_counted_in_their_buckets():
    series = metrics._Series("Things", "things", "thing_seconds", "things took",
                             ("task", "outcome"))

    def add_many(n: int) -> None:
        for i in range(1000):
            series.add((f"t{n % 2}", "ok"), 0.0002 if i % 2 else 0.2)
            series.add((f"t{n % 2}", "cancelled"), None)

    threads = [threading.Thread(target=add_many, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counter, histogram = series.families()
    counts = {tuple(s.labels.values()): s.value for s in counter.samples}
    assert counts == {("t0", "ok"): 4000, ("t1", "ok"): 4000, ("t0", "cancelled"): 4000,
                      ("t1", "cancelled"): 4000}
    got = {(s.name, s.labels["task"], s.labels["outcome"], s.labels.get("le")): s.value
           for s in histogram.samples}
    assert got["thing_seconds_bucket", "t0", "ok", "0.0005"] == 2000
    assert got["thing_seconds_bucket", "t0", "ok", "0.25"] == 4000
    assert got["thing_seconds_bucket", "t0", "cancelled", "+Inf"] == 0  # counted, not timed
    assert got["thing_seconds_count", "t1", "ok", None] == 4000
    assert abs(got["thing_seconds_sum", "t1", "ok", None] - 2000 * 0.2002) < 1e-6
