"""The dashboard against real workers and the broker: the figures workers publish on
``crew.figures``, the watcher's views (tasks, queue depths, workers, calls, failures, dead
letters), its endpoints (events, cancel, health) and their refusals. The page itself is
driven in a real browser in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import msgpack
import pika
import pytest

from crew import ExpirationError, TimeoutError, census, codec, dashboard, gateway, protocol
from crew.settings import BrokerSettings
from crew.watcher import Watcher
from tests.support.broker import delete_bound_queues, rabbitmqctl_command
from tests.support.processes import ROOT, Process, kill_alive, python_env
from tests.support.tasks import failing, napping


@pytest.fixture
def figures_queue(broker_url: str):
    """A queue of the test's own bound to crew.figures: ``read(until)`` returns the first
    figures map (decoded) for which ``until(map)`` holds, within 20 s."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    channel.exchange_declare(protocol.FIGURES_EXCHANGE, "fanout", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, protocol.FIGURES_EXCHANGE)

    def read(until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        give_up = time.monotonic() + 20
        for _method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1):
            if props is not None:
                assert props.type == protocol.FIGURES_TYPE
                assert props.content_type == protocol.MSGPACK
                figures = codec.decode(body, props.content_type)
                if until(figures):
                    channel.cancel()
                    return figures
            assert time.monotonic() < give_up, "no figures message that fits came"
        raise AssertionError("unreachable")

    yield read
    connection.close()


def test_a_worker_publishes_its_figures_and_a_last_map_when_it_stops(
        make_worker, client, io_loop, figures_queue, uid):
    ok_task, bad_task = f"ok.{uid}", f"bad.{uid}"
    worker = make_worker({ok_task: lambda data: data, bad_task: failing})
    for _ in range(3):
        io_loop.run_sync(lambda: client.call(ok_task, 1))
    with pytest.raises(Exception, match="ZeroDivisionError"):
        io_loop.run_sync(lambda: client.call(bad_task))
    mine = figures_queue(lambda m: m.get("worker") == worker.uuid
                         and bad_task in m.get("figures", {}))
    assert mine["interval"] == protocol.FIGURES_INTERVAL and mine["stopping"] is False
    assert mine["tasks"] == sorted([ok_task, bad_task]) and mine["v"] == 1
    ok = mine["figures"][ok_task]
    assert ok["outcomes"] == {"ok": 3} and sum(ok["run"]) == 3 and sum(ok["wait"]) == 3
    assert len(ok["run"]) == len(mine["buckets"]) + 1
    assert mine["figures"][bad_task]["outcomes"] == {"remote_error": 1}
    [failure] = mine["failures"]
    assert failure["task"] == bad_task and failure["type"] == "ZeroDivisionError"
    assert "1 / 0" in failure["traceback"] and failure["outcome"] == "remote_error"
    worker.request_stop(grace=0)
    last = figures_queue(lambda m: m.get("worker") == worker.uuid and m.get("stopping"))
    assert last["figures"][ok_task]["outcomes"] == {"ok": 3}


# --- the watcher and the endpoints ---------------------------------------------------------

@pytest.fixture
def watcher(io_loop, broker_url):
    made = Watcher(BrokerSettings.from_url(broker_url, name="crew-dashboard-test"),
                   refresh=0.5)
    io_loop.run_sync(made.connect)
    yield made
    io_loop.run_sync(made.close)


@pytest.fixture
def writable() -> bool:
    return True


@pytest.fixture
def app(watcher, writable):
    return dashboard.make_app(watcher, writable=writable)


async def next_view(watcher: Watcher, until: Callable[[dict[str, Any]], bool],
                    timeout: float = 20.0) -> dict[str, Any]:
    """The first view from now on for which ``until(view)`` holds."""
    views: asyncio.Queue[str] = asyncio.Queue()
    watcher.listen(views.put_nowait)
    try:
        async def wait() -> dict[str, Any]:
            while True:
                view = json.loads(await views.get())
                if until(view):
                    return view
        return await asyncio.wait_for(wait(), timeout)
    finally:
        watcher.unlisten(views.put_nowait)


def task_row(view: dict[str, Any], task: str) -> dict[str, Any] | None:
    return next((row for row in view["tasks"] if row["task"] == task), None)


@pytest.mark.gen_test(timeout=60)
async def test_views_show_the_tasks_their_figures_and_the_workers(make_worker, client,
                                                                  watcher, uid):
    task = f"echo.{uid}"
    worker = make_worker({task: lambda data: data})
    for number in range(20):
        await client.call(task, number)
    view = await next_view(watcher, lambda v: (task_row(v, task) or {}).get("rate"))
    row = task_row(view, task)
    assert row["consumers"] == 1 and row["messages"] == 0 and row["workers"] == 1
    assert row["rate"] > 0 and 0 < row["p50"] <= row["p95"] < 5
    assert row["errors"] == row["killed"] == row["expired"] == 0
    [me] = [w for w in view["workers"] if w["worker"] == worker.uuid]
    assert me["busy"] == 0 and me["concurrency"] == worker.concurrency and not me["stale"]
    assert view["broker"] == "up" and isinstance(view["at"], int)


@pytest.mark.gen_test(timeout=60)
async def test_a_queue_whose_workers_went_shows_its_waiting_calls(make_worker, client,
                                                                  watcher, uid):
    task = f"left.{uid}"
    worker = make_worker({task: lambda data: data})
    await client.call(task)
    await next_view(watcher, lambda v: task_row(v, task) is not None)
    worker.request_stop(grace=0)
    await next_view(watcher, lambda v: (task_row(v, task) or {}).get("consumers") == 0)
    calls = [asyncio.ensure_future(client.call(task, expiration=30)) for _ in range(3)]
    view = await next_view(watcher, lambda v: (task_row(v, task) or {}).get("messages") == 3)
    assert task_row(view, task)["workers"] == 0
    for call in calls:
        call.cancel()


@pytest.mark.gen_test(timeout=60)
async def test_calls_that_expire_in_their_queue_are_counted(make_worker, client, watcher,
                                                            uid):
    task = f"busy.{uid}"
    stopped = threading.Event()
    make_worker({task: napping(stopped)}, concurrency=1)
    running = asyncio.ensure_future(client.call(task, expiration=20))
    await next_view(watcher, lambda v: any(c["task"] == task for c in v["calls"]))
    with pytest.raises(ExpirationError):
        await client.call(task, expiration=0.5)  # waits behind the running one, expires
    view = await next_view(watcher, lambda v: (task_row(v, task) or {}).get("expired"))
    assert task_row(view, task)["expired"] == 1
    running.cancel()


@pytest.mark.gen_test(timeout=60)
async def test_forged_dead_letters_neither_count_nor_disturb_it(make_worker, client, watcher,
                                                                 broker_url, uid, caplog):
    # Anyone who may publish to crew.expired reaches the watcher's catch-all binding: x-death
    # in shapes the broker never writes must be ignored, and must not cost its connection.
    task = f"forged.{uid}"
    make_worker({task: lambda data: data})
    await next_view(watcher, lambda v: task_row(v, task) is not None)
    connection = watcher._connection
    forged = [5, "nonsense", {"0": 1}, [], [1], [{"reason": 7, "queue": [task]}],
              [{"reason": "expired", "queue": "someone.elses"}]]
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as publisher:
        channel = publisher.channel()
        for x_death in forged:
            channel.basic_publish(protocol.EXPIRED_EXCHANGE, "", b"",
                                  pika.BasicProperties(headers={"x-death": x_death}))
        channel.basic_publish(protocol.EXPIRED_EXCHANGE, "", b"", pika.BasicProperties(
            headers={"x-death": [{"reason": "expired", "queue": protocol.task_queue(task)}]}))
    view = await next_view(watcher, lambda v: (task_row(v, task) or {}).get("expired"))
    assert task_row(view, task)["expired"] == 1  # the one in the broker's shape
    assert watcher._connection is connection and watcher.connected
    assert "connecting again" not in caplog.text


def _msgpack_map(**fields: bytes) -> bytes:
    """A msgpack map of up to 15 fields, each value given encoded (msgpack's own packer
    refuses to nest 990 lists)."""
    return bytes([0x80 | len(fields)]) + b"".join(
        msgpack.packb(key) + value for key, value in fields.items())


@pytest.mark.gen_test(timeout=60)
async def test_forged_figures_with_huge_or_deep_values_neither_cut_nor_stop_it(
        make_worker, client, watcher, broker_url, uid, caplog):
    # Anyone who may publish to crew.figures reaches every dashboard: a JSON integer of 400
    # digits overflowed float arithmetic (in pika's callback: the connection closed), lists
    # 990 deep exhausted the stack in a comparison (the callback) or in the view (which ended
    # the watcher's loop for good).
    task = f"figured.{uid}"
    make_worker({task: lambda data: data})
    await next_view(watcher, lambda v: task_row(v, task) is not None)
    connection = watcher._connection
    deep = b"\x91" * 990 + b"\xc0"
    forged = [
        (protocol.JSON, json.dumps({"worker": f"huge.{uid}", "uptime": 10**400}).encode()),
        (protocol.MSGPACK, _msgpack_map(worker=msgpack.packb(f"deep.{uid}"), host=deep)),
        *[(protocol.MSGPACK, _msgpack_map(
            worker=msgpack.packb(f"run.{uid}"), tasks=msgpack.packb([task]),
            buckets=msgpack.packb([1.0]), figures=_msgpack_map(**{task: _msgpack_map(
                outcomes=msgpack.packb({"ok": 1}), run=deep)})))] * 2,
    ]
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as publisher:
        channel = publisher.channel()
        for content_type, body in forged:
            channel.basic_publish(protocol.FIGURES_EXCHANGE, "", body, pika.BasicProperties(
                type=protocol.FIGURES_TYPE, content_type=content_type))
    await client.call(task, 1)
    view = await next_view(watcher, lambda v: (task_row(v, task) or {}).get("rate"))
    assert {f"deep.{uid}", f"run.{uid}"} <= {w["worker"] for w in view["workers"]}
    assert watcher._connection is connection and watcher.connected
    assert "connecting again" not in caplog.text


@pytest.mark.gen_test(timeout=60)
async def test_cancel_ends_a_running_call(make_worker, client, watcher, http_client,
                                          base_url, uid):
    task = f"nap.{uid}"
    stopped = threading.Event()
    make_worker({task: napping(stopped)})
    call = asyncio.ensure_future(client.call(task, expiration=30))
    view = await next_view(watcher, lambda v: any(c["task"] == task for c in v["calls"]))
    [running] = [c for c in view["calls"] if c["task"] == task]
    assert running["state"] == "running" and 0 < running["deadline"] <= 30
    answer = await http_client.fetch(f"{base_url}/cancel/{running['correlation_id']}",
                                     method="POST", body=b"", raise_error=False)
    assert answer.code == 202, answer.body
    assert json.loads(answer.body) == {"cancelled": running["correlation_id"], "task": task}
    await asyncio.to_thread(stopped.wait, 10)
    assert stopped.is_set(), "the job was not interrupted"
    view = await next_view(watcher, lambda v: not any(c["task"] == task for c in v["calls"]))
    assert not call.done()  # a cancelled call gets no reply: its caller's deadline ends it
    call.cancel()
    missing = await http_client.fetch(f"{base_url}/cancel/no.such.call", method="POST",
                                      body=b"", raise_error=False)
    assert missing.code == 404 and json.loads(missing.body)["error"] == "NotFound"


@pytest.mark.gen_test(timeout=30)
async def test_a_write_from_another_origin_is_refused(http_client, base_url):
    other = await http_client.fetch(f"{base_url}/cancel/c.1", method="POST", body=b"",
                                    headers={"Origin": "http://evil.example"},
                                    raise_error=False)
    assert other.code == 403 and json.loads(other.body)["error"] == "CrossOrigin"
    same = await http_client.fetch(f"{base_url}/cancel/c.1", method="POST", body=b"",
                                   headers={"Origin": base_url}, raise_error=False)
    assert same.code == 404  # let through: no worker runs that call


@pytest.mark.parametrize("writable", [False])
@pytest.mark.gen_test(timeout=30)
async def test_read_only_refuses_cancel_and_the_page_offers_none(http_client, base_url,
                                                                 writable):
    assert writable is False
    refused = await http_client.fetch(f"{base_url}/cancel/c.1", method="POST", body=b"",
                                      raise_error=False)
    assert refused.code == 403 and json.loads(refused.body)["error"] == "ReadOnly"
    page = await http_client.fetch(f"{base_url}/dashboard")
    assert b'data-writable="false"' in page.body


@pytest.mark.gen_test(timeout=30)
async def test_page_events_and_health(http_client, base_url, watcher):
    page = await http_client.fetch(f"{base_url}/dashboard")
    assert page.headers["Content-Type"].startswith("text/html")
    assert b'data-writable="true"' in page.body
    assert b"http://" not in page.body and b"https://" not in page.body  # nothing from outside
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    await next_view(watcher, lambda v: v["broker"] == "up")  # it connects in the background
    health = await http_client.fetch(f"{base_url}/health", raise_error=False)
    assert (health.code, json.loads(health.body)) == (200, {"broker": "up"})
    chunks: list[bytes] = []
    done = asyncio.get_running_loop().create_future()

    def on_chunk(chunk: bytes) -> None:
        chunks.append(chunk)
        if b"".join(chunks).count(b"data: ") >= 2 and not done.done():
            done.set_result(None)

    fetch = asyncio.ensure_future(http_client.fetch(
        f"{base_url}/dashboard/events", streaming_callback=on_chunk, request_timeout=20,
        raise_error=False))
    await asyncio.wait_for(done, 15)
    fetch.cancel()
    events = [line[6:] for line in b"".join(chunks).decode().splitlines()
              if line.startswith("data: ")]
    assert {"tasks", "workers", "calls", "failures", "broker", "window"} <= set(
        json.loads(events[0]))


@pytest.mark.gen_test(timeout=60)
async def test_the_watcher_follows_again_when_its_queue_is_deleted(make_worker, watcher,
                                                                  broker_url, uid):
    worker = make_worker({f"here.{uid}": lambda data: data})
    mine = lambda v: [w for w in v["workers"] if w["worker"] == worker.uuid]  # noqa: E731
    await next_view(watcher, lambda v: bool(mine(v)))
    delete_bound_queues(broker_url, protocol.FIGURES_EXCHANGE)
    deleted = time.monotonic()
    # Unfed, the worker's row would grow stale: it must be heard from again, and lately.
    view = await next_view(watcher, lambda v: time.monotonic() - deleted > 8
                           and bool(mine(v)) and mine(v)[0]["seen"] < 3, timeout=30)
    assert not mine(view)[0]["stale"]


@pytest.mark.gen_test(timeout=30)
async def test_the_gateway_serves_the_dashboard(client, watcher):
    app = gateway.make_app(client, watcher=watcher)
    paths = {rule.matcher.regex.pattern for rule in app.default_router.rules[0].target.rules}
    assert {"/dashboard$", "/dashboard/events$", "/cancel/([^/]+)$"} <= paths
    assert gateway.make_app(client).settings["writable"] is True


def test_crew_dashboard_serves_alone_until_sigterm(broker_url):
    dashboard_process = Process(["-m", "crew", "dashboard", "--port", "0", "--read-only"],
                                python_env(broker_url), cwd=ROOT)
    try:
        port = int(dashboard_process.wait_for(r"listening on http://127\.0\.0\.1:(\d+)/")[1])
        dashboard_process.wait_for("dashboard: watching the workers")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as health:
            assert json.loads(health.read()) == {"broker": "up"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.url.endswith("/dashboard")  # / leads to the page
            assert b'data-writable="false"' in page.read()
        assert dashboard_process.stop(signal.SIGTERM) == 0
    finally:
        kill_alive([dashboard_process])


@pytest.mark.gen_test(timeout=30)
async def test_a_queue_it_may_not_read_does_not_stop_the_figures(broker_url, uid):
    """Another connection's exclusive queue of a task's name answers a passive declare with
    405: that task's figures are unknown (None), the others' still come."""
    holder = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        holder.channel().queue_declare(protocol.task_queue(f"locked.{uid}"), exclusive=True)
        connection = await census.connect(BrokerSettings.from_url(broker_url), timeout=10)
        try:
            figures = await census.queue_figures(
                connection, [f"locked.{uid}", f"missing.{uid}"])
        finally:
            await connection.close()
        assert figures == {f"locked.{uid}": None, f"missing.{uid}": None}
    finally:
        holder.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_watcher_that_fails_at_once_waits_before_it_tries_again(broker_url):
    """In a vhost where crew.figures has another type, every set-up fails with 406 right
    after connecting: the watcher must back off, not spin."""
    rabbitmqctl = rabbitmqctl_command()
    assert rabbitmqctl, "set CREW_TEST_RABBITMQCTL with CREW_TEST_URL: this test makes a vhost"
    vhost = f"crew-test-figures-{uuid.uuid4().hex[:8]}"
    ctl = [*rabbitmqctl, "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
        url = urlunsplit(urlsplit(broker_url)._replace(path=f"/{vhost}"))
        blocker = pika.BlockingConnection(pika.URLParameters(url))
        blocker.channel().exchange_declare(protocol.FIGURES_EXCHANGE, "topic", durable=True)
        blocker.close()
        watcher = Watcher(BrokerSettings.from_url(url), refresh=0.5)
        views: list[str] = []
        watcher.listen(views.append)
        await watcher.connect()
        await asyncio.sleep(4)  # a window to count in, not a wait for something
        await watcher.close()
        assert 1 <= len(views) <= 5, len(views)  # about 1 + 2 + 4 s of waits: 3 tries
        assert all(json.loads(view)["broker"] == "down" for view in views)
    finally:
        subprocess.run([*ctl, "delete_vhost", vhost], check=True, capture_output=True,
                       timeout=60)


@pytest.mark.gen_test(timeout=30)
async def test_views_are_made_only_while_someone_listens(broker_url):
    watcher = Watcher(BrokerSettings.from_url(broker_url), refresh=30.0)
    made: list[float] = []
    view = watcher.board.view
    watcher.board.view = lambda *args: made.append(time.monotonic()) or view(*args)
    await watcher.connect()
    try:
        await asyncio.sleep(1.5)  # connected, and nobody listens: nothing to make
        assert made == []
        views: asyncio.Queue[str] = asyncio.Queue()
        listening = time.monotonic()
        watcher.listen(views.put_nowait)
        await asyncio.wait_for(views.get(), 10)  # at once, not after the 30 s refresh
        assert made and made[0] - listening < 10
    finally:
        await watcher.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_dashboard_started_late_is_complete_within_seconds(make_worker, client,
                                                                   broker_url, uid):
    """It stores nothing: a dashboard (re)started after the calls were made shows the worker,
    its task and, for a worker younger than the window, the calls it served since it
    started, from the workers' next messages."""
    task = f"early.{uid}"
    worker = make_worker({task: lambda data: data})
    for number in range(10):
        await client.call(task, number)
    watcher = Watcher(BrokerSettings.from_url(broker_url), refresh=0.5)
    await watcher.connect()
    try:
        started = time.monotonic()
        view = await next_view(watcher, lambda v: (task_row(v, task) or {}).get("rate"))
        assert time.monotonic() - started < 3 * protocol.FIGURES_INTERVAL + 1
        assert worker.uuid in [w["worker"] for w in view["workers"]]
        assert task_row(view, task)["p50"] is not None
    finally:
        await watcher.close()


def test_a_killed_jobs_failure_shows_where_it_was(make_worker, client, io_loop,
                                                 figures_queue, uid):
    task = f"stuck.{uid}"
    stopped = threading.Event()
    worker = make_worker({task: napping(stopped)})
    with pytest.raises(TimeoutError):
        io_loop.run_sync(lambda: client.call(task, expiration=1.0), timeout=30)
    assert stopped.wait(10)
    mine = figures_queue(lambda m: m.get("worker") == worker.uuid and m.get("failures"))
    [failure] = mine["failures"]
    assert failure["outcome"] == "killed" and failure["type"] == "JobKilled"
    assert failure["message"] == "the job ran past its deadline"
    assert failure["traceback"].startswith("Where the job was at its deadline")
    assert "in nap" in failure["traceback"] and "time.sleep(0.02)" in failure["traceback"]
