"""``SyncClient`` through a broker restart (issue 17): calls made from threads while the
private node is killed with -9, while it is down, and after it is back, each ending once,
within its deadline plus the grace and the thread hop. The harness, its node and its worker
processes are those of tests/nodes/test_faults.py (tests/support/faults.py)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Iterator

import pytest

import crew
from crew.syncruntime import HOP_MARGIN

from tests.support.faults import PrivateBroker, Workers

pytest_plugins = ["tests.support.faults"]
pytestmark = pytest.mark.faults

#: Bound on how long a fault may take to reach a pending call, and on what a busy machine
#: adds to a deadline.
NOTICE = 5.0


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(16) as executor:
        yield executor


def outcomes(futures: list["Future[Any]"], timeout: float) -> list[tuple[Any, float]]:
    _, pending = wait(futures, timeout)
    assert not pending, f"{len(pending)} call(s) unanswered after {timeout} s"
    return [f.result() for f in futures]


def test_sync_calls_through_a_broker_kill9_and_restart(broker: PrivateBroker,
                                                      fault_workers: Workers,
                                                      fault_prefix: str, pool):
    worker = fault_workers.start(broker.url, "-c", "4")
    worker.wait_for("serving", 60)
    client = crew.SyncClient(broker.url)
    job, echo = f"{fault_prefix}.job", f"{fault_prefix}.echo"
    try:
        assert client.call(echo, {"id": "first"}, expiration=20)["id"] == "first"
        bound = client.deadline_grace + HOP_MARGIN + NOTICE

        def call(task: str, expiration: float, retry: bool = False, **data: Any) -> Future:
            call_id = f"s{uuid.uuid4().hex[:8]}"
            made = time.monotonic()

            def run() -> tuple[Any, float]:
                try:
                    outcome = client.call(task, {"id": call_id, **data},
                                          expiration=expiration, retry=retry)
                except crew.CrewError as exc:
                    outcome = exc
                return outcome, time.monotonic() - made

            future = pool.submit(run)
            future.call_id = call_id  # type: ignore[attr-defined]
            return future

        plain = [call(job, 40, sleep=4) for _ in range(2)]
        retried = [call(job, 60, retry=True, sleep=4) for _ in range(2)]
        for future in plain + retried:
            fault_workers.runs.wait_started(future.call_id, 30)
        broker.kill9()
        for outcome, _ in outcomes(plain, NOTICE + 5):
            assert isinstance(outcome, crew.ConnectionLostError), outcome
        assert not any(f.done() for f in retried), "retry=True calls wait for the broker"
        assert not client.connected

        while_down = [call(echo, 40) for _ in range(2)]
        [(short, seconds)] = outcomes([call(echo, 3)], 3 + bound)
        assert isinstance(short, (crew.TimeoutError, crew.ConnectionLostError)), short
        assert seconds < 3 + bound
        assert not any(f.done() for f in while_down), "calls made while down wait"

        broker.start()
        for outcome, _ in outcomes(retried, 60):
            assert not isinstance(outcome, BaseException), outcome
        for outcome, _ in outcomes(while_down, 60):
            # Seen once in CI (6 December): a call the client sent as soon as it had
            # reconnected came back unroutable (UnknownTaskError) although its durable queue
            # exists; the broker had not made it routable again yet (docs/FAULTS.md, known
            # problems). Still an answer by its deadline, never a hang or a wrong result.
            assert not isinstance(outcome, BaseException) or isinstance(
                outcome, crew.UnknownTaskError), outcome
        assert client.connected
        after = [call(echo, 20) for _ in range(8)]
        for outcome, _ in outcomes(after, 20 + bound):
            assert not isinstance(outcome, BaseException), outcome
        assert worker.popen.poll() is None, "the worker should have reconnected"
    finally:
        client.close()
    broker.wait_drained(lambda name: fault_prefix in name)
    assert worker.stop() == 0
