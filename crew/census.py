"""What is out there: the live workers and the task queues, for ``crew status``, ``crew
inspect``, ``crew cancel`` and ``crew purge``.

Workers are found by asking them (:mod:`crew.presence`): a request to ``crew.presence``,
answered to a reply queue of the asker's own, whose answers are gathered for a window
(1 s by default). A worker that does not answer within it is not listed; one that answers
later is not an error (its answer goes to a queue that is gone). Task queues are found
without the management plugin: AMQP cannot list queues, so the tasks crew knows of are
those the live workers serve, and those named on the command line; a passive declare
gives each one's depth and consumers. Queue type and maximum priority come from the
workers' answers (every worker of a task declares its queue alike, or the broker refuses
it), unknown for a queue no live worker serves.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Iterable

from pika.spec import Basic, BasicProperties

from . import codec, protocol
from .amqp import Channel, Connection
from .connecting import NOT_FOUND, Nodes, connect_retrying
from .exceptions import BrokerError, CodecError
from .settings import BrokerSettings

__all__ = ["DEFAULT_WINDOW", "connect", "find_call", "gather", "inspect_table", "purge",
           "queue_figures", "status", "status_tables"]

log = logging.getLogger(__name__)

#: Why a passive declare may fail for one queue: not found, access refused, locked
#: (another connection's exclusive queue). Other codes are connection errors.
_UNREADABLE = frozenset({NOT_FOUND, 403, 405})

#: Seconds the answers of the workers are gathered for, unless told otherwise.
DEFAULT_WINDOW = 1.0


async def connect(broker: BrokerSettings, timeout: float) -> Connection:
    """A connection to one of ``broker``'s nodes, tried for up to ``timeout`` seconds."""
    nodes = Nodes(broker)
    return await connect_retrying(lambda: Connection.open(nodes.next()), who="crew",
                                  timeout=timeout)


async def gather(connection: Connection, window: float = DEFAULT_WINDOW) -> list[dict[str, Any]]:
    """The presence maps of the workers that answer within ``window`` seconds, one per
    worker, by host and pid."""
    channel = await connection.channel()
    await channel.declare_exchange(protocol.PRESENCE_EXCHANGE, "fanout")
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    request = uuid.uuid4().hex
    answers: dict[str, dict[str, Any]] = {}

    def on_answer(_ch: Any, _method: Basic.Deliver, props: BasicProperties,
                  body: bytes) -> None:
        if props.type != protocol.PRESENCE_TYPE or props.correlation_id != request:
            return  # an answer to another request of this queue cannot come; be strict
        try:
            answer = codec.decode(body, props.content_type, props.content_encoding)
        except CodecError as exc:
            log.warning("a presence answer could not be read: %s", exc)
            return
        if isinstance(answer, dict) and isinstance(answer.get("worker"), str):
            answers[answer["worker"]] = answer

    await channel.consume(queue, on_answer, auto_ack=True, exclusive=True)
    channel.publish(protocol.PRESENCE_EXCHANGE, "", b"", BasicProperties(
        type=protocol.PRESENCE_REQUEST_TYPE, reply_to=queue, correlation_id=request,
        delivery_mode=1))
    channel.flush()
    await asyncio.sleep(window)  # a window, not a poll: every worker answers at most once
    await channel.close()
    return sorted(answers.values(), key=_host_and_pid)


def _host_and_pid(answer: dict[str, Any]) -> tuple[str, int]:
    pid = answer.get("pid")
    return str(answer.get("host")), pid if isinstance(pid, int) else 0


async def queue_figures(connection: Connection,
                        tasks: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    """``(messages ready, consumers)`` of each task's queue; None for a queue that does not
    exist, or that this connection may not read (another's exclusive queue: 405; no
    permission: 403). Each such passive declare closes the channel: the next task gets a
    new one. Only a lost connection raises."""
    figures: dict[str, tuple[int, int] | None] = {}
    channel: Channel | None = None
    for task in tasks:
        if channel is None or not channel.is_open:
            channel = await connection.channel()
        try:
            figures[task] = await channel.queue_counts(protocol.task_queue(task))
        except BrokerError as exc:
            if exc.code not in _UNREADABLE:
                raise
            figures[task] = None
    if channel is not None:
        await channel.close()
    return figures


async def status(connection: Connection, window: float,
                 named: Iterable[str] = ()) -> dict[str, Any]:
    """``crew status --json``: ``{"tasks": [...], "workers": [...]}``."""
    workers = await gather(connection, window)
    serving: dict[str, list[dict[str, Any]]] = {}
    for worker in workers:
        for task in worker.get("tasks") or ():
            serving.setdefault(str(task), []).append(worker)
    for task in named:
        serving.setdefault(task, [])
    figures = await queue_figures(connection, sorted(serving))
    tasks = []
    for task, its_workers in sorted(serving.items()):
        counts, first = figures[task], (its_workers[0] if its_workers else {})
        tasks.append({
            "task": task, "queue": protocol.task_queue(task), "exists": counts is not None,
            "messages": counts[0] if counts else None, "consumers": counts[1] if counts else None,
            "queue_type": first.get("queue_type"), "max_priority": first.get("max_priority"),
            "workers": len(its_workers)})
    return {"tasks": tasks, "workers": [{k: v for k, v in worker.items() if k != "calls"}
                                        for worker in workers]}


def find_call(workers: list[dict[str, Any]],
              correlation_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The worker serving the call ``correlation_id``, and the call, if one answered so."""
    for worker in workers:
        for call in worker.get("calls") or ():
            if isinstance(call, dict) and call.get("correlation_id") == correlation_id:
                return worker, call
    return None


async def purge(connection: Connection, task: str) -> int:
    """Delete the calls waiting in ``task``'s queue; return how many (running ones stay)."""
    channel = await connection.channel()
    try:
        return await channel.purge(protocol.task_queue(task))
    finally:
        await channel.close()


# --- readable output -------------------------------------------------------------------

def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell; None shows as ``-``."""
    cells = [headers] + [["-" if cell is None else str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in cells)
    return "\n".join(line.rstrip() for line in lines)


def status_tables(report: dict[str, Any]) -> str:
    """``crew status``, readable: the tasks, then the workers."""
    tasks = table(["TASK", "MESSAGES", "CONSUMERS", "TYPE", "MAX PRIORITY", "WORKERS"], [
        [t["task"], t["messages"] if t["exists"] else "no queue", t["consumers"],
         t["queue_type"], t["max_priority"], t["workers"]] for t in report["tasks"]])
    workers = table(["WORKER", "HOST", "PID", "VERSION", "BUSY", "STUCK", "UPTIME", "TASKS"], [
        [w.get("worker"), w.get("host"), w.get("pid"), w.get("version"),
         f"{w.get('busy')}/{w.get('concurrency')}", w.get("stuck"),
         _duration(w.get("uptime")), ", ".join(map(str, w.get("tasks") or ()))]
        for w in report["workers"]])
    return (f"{tasks}\n\n{workers}\n{len(report['workers'])} worker(s) answered")


def inspect_table(workers: list[dict[str, Any]]) -> str:
    """``crew inspect``, readable: one line per call, under its worker."""
    now_ms = protocol.now_ms()
    rows = [[w.get("worker"), c.get("task"), c.get("correlation_id"), c.get("caller"),
             c.get("state"), _duration(c.get("elapsed")),
             _duration((c["deadline"] - now_ms) / 1000) if "deadline" in c else None]
            for w in workers for c in w.get("calls") or ()]
    calls = table(["WORKER", "TASK", "CORRELATION ID", "CALLER", "STATE", "ELAPSED",
                   "DEADLINE IN"], rows)
    return f"{calls}\n{len(rows)} call(s) on {len(workers)} worker(s)"


def _duration(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)):
        return None
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m" if abs(seconds) < 7200 else f"{seconds / 3600:.0f}h"
