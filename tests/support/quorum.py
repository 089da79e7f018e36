"""Quorum task queues under test, on the shared 3.10 broker and on a private 4.x node: the
broker's version, a queue's ready calls, the order calls of mixed priorities are served in,
and a poison call: a task that kills its worker process (``os._exit``) every time it runs,
served by a loop of short-lived worker processes, each started when the one before died,
until the call has its answer."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pika

from crew import Client
from crew.worker import Worker, serve_in_thread
from tests.support.processes import Output, spawn_python


def server_version(url: str) -> tuple[int, ...]:
    """RabbitMQ's version at ``url``, e.g. (3, 10, 8)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        version = connection._impl.server_properties["version"]
    finally:
        connection.close()
    text = version.decode() if isinstance(version, bytes) else version
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def ready_calls(url: str, queue: str) -> int:
    """How many messages ``queue`` holds ready (a passive declare: 404 if it is gone)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


async def served_order(client: Client, url: str, task: str, priorities: list[int],
                       **worker: Any) -> list[int]:
    """Queue one call per priority (in this order, no worker running), then serve them with
    one worker of concurrency 1; return the priorities in the order the task saw them."""
    starter = Worker({task: lambda x: x}, broker=url, **worker)
    started = serve_in_thread(starter)
    starter.request_stop(grace=0)  # the queue exists now, without a consumer
    await asyncio.to_thread(started.join, 30)
    calls = [asyncio.ensure_future(client.call(task, p, priority=p, expiration=60))
             for p in priorities]
    for _ in range(100):  # until every call is in the queue
        if await asyncio.to_thread(ready_calls, url, "crew.tasks." + task) == len(priorities):
            break
        await asyncio.sleep(0.1)
    seen: list[int] = []
    lock = threading.Lock()

    def record(p: int) -> int:
        with lock:
            seen.append(p)
        time.sleep(0.01)
        return p

    worker_ = Worker({task: record}, broker=url, concurrency=1, **worker)
    thread = serve_in_thread(worker_)
    try:
        await asyncio.wait_for(asyncio.gather(*calls), 60)
    finally:
        worker_.request_stop(grace=0)
        await asyncio.to_thread(thread.join, 30)
    return seen

#: The worker module: one task that exits the process with status 17 without a word.
WORKER = """\
import os
from crew.worker import Task, run


@Task({task!r})
def poison(data):
    os._exit(17)


run()
"""


async def call_poison(client: Client, broker_url: str, task: str, directory: Path, *,
                      max_workers: int = 12, **call: Any) -> tuple[BaseException | Any, int]:
    """Call ``task`` (quorum queues) while restarting its dying worker; return the call's
    outcome (the error it raised, or its value) and how many workers died on it."""
    script = directory / "poison_worker.py"
    script.write_text(WORKER.format(task=task))
    deaths = 0
    call_made: asyncio.Future[Any] | None = None
    for _ in range(max_workers):
        proc = spawn_python([str(script), "--queue-type", "quorum"], broker_url)
        output = Output(proc)
        try:
            if call_made is None:  # once the queue exists, call (later workers die at once)
                await output.wait_for("serving", timeout=30)
                call_made = asyncio.ensure_future(client.call(task, None, **call))
            code = await _exit_or_answer(proc, call_made)
        finally:
            if proc.poll() is None:
                proc.kill()
                await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        if code is None:  # answered while this worker lived
            break
        assert code == 17, f"the worker exited with {code}, not 17:\n{output.everything()}"
        deaths += 1
        if call_made.done():
            break
        await asyncio.sleep(0.2)  # the call has its answer, or goes back to the queue
    assert call_made is not None and call_made.done(), f"no answer after {deaths} deaths"
    try:
        return call_made.result(), deaths
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the tests check
        return exc, deaths


async def _exit_or_answer(proc: subprocess.Popen[str], call: asyncio.Future[Any]) -> int | None:
    """The worker's exit status once it died, or None if the call was answered first."""
    loop = asyncio.get_running_loop()
    exited = loop.run_in_executor(None, proc.wait, 60)
    await asyncio.wait([exited, call], return_when=asyncio.FIRST_COMPLETED, timeout=60)
    if exited.done():
        return exited.result()
    await asyncio.sleep(2.0)  # the answer came: the worker may still be dying
    return exited.result() if exited.done() else None
