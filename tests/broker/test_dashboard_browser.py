"""The dashboard's page in a real browser (headless Debian chromium, tests/support/browser.py),
served by ``crew dashboard`` as a process, showing real workers: it loads, shows the tasks
and workers, updates when calls are made, and Cancel ends a running call; read-only it
offers no Cancel; with 300 tasks and 30 workers it stays quick."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator

import pika
import pytest

from crew import SyncClient, TimeoutError, protocol
from tests.support.browser import wait_for, wait_for_js
from tests.support.fakeworkers import FakeFleet
from tests.support.processes import ROOT, Process, kill_alive, python_env
from tests.support.tasks import failing, napping


@pytest.fixture
def serve_dashboard(broker_url: str) -> Iterator[Callable[..., str]]:
    """``serve_dashboard(*options)``: ``crew dashboard --port 0`` as a process; its page's URL."""
    started: list[Process] = []

    def serve(*options: str) -> str:
        process = Process(["-m", "crew", "dashboard", "--port", "0", *options],
                          python_env(broker_url), cwd=ROOT)
        started.append(process)
        port = process.wait_for(r"listening on http://127\.0\.0\.1:(\d+)/")[1]
        process.wait_for("dashboard: watching the workers")
        return f"http://127.0.0.1:{port}/dashboard"

    yield serve
    kill_alive(started)


@pytest.fixture
def sync_client(broker_url: str) -> Iterator[SyncClient]:
    client = SyncClient(broker_url)
    yield client
    client.close()


def row(selector: str, key: str) -> str:
    return f'document.querySelector(\'{selector}[data-{key}]\')'


def cell(task: str, name: str) -> str:
    return f'document.querySelector(\'#tasks tr[data-task="{task}"] td.{name}\')?.textContent'


def test_the_page_shows_the_tasks_and_workers_and_follows_the_calls(
        browser, serve_dashboard, make_worker, sync_client, uid):
    echo, bad = f"echo.{uid}", f"bad.{uid}"
    worker = make_worker({echo: lambda data: data, bad: failing})
    browser.get(serve_dashboard())
    wait_for_js(browser, "document.getElementById('status').textContent === 'connected'")
    wait_for_js(browser, f"document.querySelector('#workers tr[data-worker=\"{worker.uuid}\"]')")
    assert browser.execute_script(f"return {cell(echo, 'consumers')}") == "1"
    assert browser.title == "crew dashboard"
    updates = int(browser.find_element("tag name", "body").get_attribute("data-updates"))
    for number in range(20):
        assert sync_client.call(echo, number) == number
    rate = wait_for(browser, lambda d: (d.execute_script(f"return {cell(echo, 'rate')}")
                                        not in (None, "–", "0.00")) and d.execute_script(
                                            f"return {cell(echo, 'rate')}"), timeout=15,
                    what="a rate for the calls made")
    assert float(rate) > 0
    assert int(browser.find_element("tag name", "body").get_attribute("data-updates")) > updates
    with pytest.raises(Exception, match="ZeroDivisionError"):
        sync_client.call(bad)
    wait_for_js(browser, f"{cell(bad, 'errors')} === '1'", timeout=15)
    failure = wait_for(browser, lambda d: d.find_elements(
        "css selector", "#failures li[data-call] summary"), what="a failure listed")[0]
    assert bad in failure.text and "ZeroDivisionError" in failure.text
    failure.click()  # opens its traceback, which stays open across views
    traceback = browser.find_element("css selector", "#failures li[data-call] pre.traceback")
    wait_for(browser, lambda d: traceback.is_displayed() or None, what="the traceback shown")
    assert "1 / 0" in traceback.text


def test_cancel_ends_a_running_call(browser, serve_dashboard, make_worker, sync_client, uid):
    task = f"nap.{uid}"
    stopped = threading.Event()
    make_worker({task: napping(stopped)})
    caller_saw: list[BaseException] = []

    def call() -> None:
        try:
            sync_client.call(task, expiration=12)
        except BaseException as exc:  # noqa: BLE001 - kept for the test to look at
            caller_saw.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    browser.get(serve_dashboard())
    button = wait_for(browser, lambda d: d.find_elements(
        "css selector", "#calls tr[data-call] button.cancel"), timeout=15,
        what="the running call's Cancel button")[0]
    assert browser.find_element("css selector", "#calls tr[data-call] td.task").text == task
    button.click()  # arms it: a single click cancels nothing
    wait_for_js(browser, "document.querySelector('#calls button.cancel.armed')")
    time.sleep(0.5)  # not a wait for a condition: a single click must not have cancelled
    assert not stopped.is_set()
    browser.find_element("css selector", "#calls button.cancel.armed").click()
    assert stopped.wait(15), "the job was not interrupted"
    wait_for_js(browser, "!document.querySelector('#calls tr[data-call]')", timeout=15)
    caller.join(20)
    assert len(caller_saw) == 1 and isinstance(caller_saw[0], TimeoutError)  # no reply came


def test_read_only_offers_no_cancel(browser, serve_dashboard, make_worker, sync_client, uid):
    task = f"nap.{uid}"
    stopped = threading.Event()
    make_worker({task: napping(stopped)})
    def call() -> None:
        with pytest.raises(TimeoutError):
            sync_client.call(task, expiration=6)

    caller = threading.Thread(target=call)
    caller.start()
    browser.get(serve_dashboard("--read-only"))
    wait_for_js(browser, "document.querySelector('#calls tr[data-call]')", timeout=15)
    assert browser.find_elements("css selector", "button.cancel") == []
    caller.join(15)


def test_three_hundred_tasks_and_thirty_workers_stay_quick(browser, serve_dashboard,
                                                           broker_url):
    fleet = FakeFleet(broker_url, workers=30, tasks=300, workers_per_task=5)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    channel = connection.channel()
    try:
        for task in fleet.task_names:  # the queues, as real workers declare them (durable:
            # a transient queue that is not exclusive is a deprecated feature of RabbitMQ 4.x)
            channel.queue_declare(protocol.task_queue(task), durable=True,
                                  arguments=protocol.task_queue_arguments(10))
        with fleet:
            browser.get(serve_dashboard())
            wait_for_js(browser, "document.querySelectorAll('#tasks tbody tr[data-task]')"
                                 ".length === 300 && document.querySelectorAll("
                                 "'#workers tbody tr[data-worker]').length === 30", timeout=30)
            start = int(browser.find_element("tag name", "body").get_attribute("data-updates"))
            wait_for_js(browser, f"Number(document.body.dataset.updates) >= {start + 3}",
                        timeout=20)
            renders = [float(browser.find_element("tag name", "body").get_attribute(
                "data-render-ms"))]
            wait_for_js(browser, f"Number(document.body.dataset.updates) >= {start + 4}",
                        timeout=20)
            renders.append(float(browser.find_element("tag name", "body").get_attribute(
                "data-render-ms")))
            # Generous: about 90 ms on a busy 2-core machine; the bound is for a page that
            # would freeze the browser, not a benchmark.
            assert min(renders) < 1000, renders
            first = fleet.task_names[0]
            browser.find_element("id", "filter").send_keys(first)
            shown = wait_for_js(browser, "Array.from(document.querySelectorAll("
                                         "'#tasks tbody tr[data-task]'), r => r.dataset.task)"
                                         f".every(t => t.includes('{first}')) && "
                                         "document.querySelectorAll('#tasks tbody tr"
                                         "[data-task]').length")
            assert 1 <= shown < 300
            # The cells show the queues' figures, not "no queue": the passive declares kept up.
            assert browser.execute_script(f"return {cell(first, 'consumers')}") == "0"
    finally:
        for task in fleet.task_names:
            channel.queue_delete(protocol.task_queue(task))
        connection.close()
