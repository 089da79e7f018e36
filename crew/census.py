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
from typing import Any, Callable, Iterable

from pika.spec import Basic, BasicProperties

from . import codec, protocol, validation
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
    worker, by host and pid; each checked (:class:`_Answers`)."""
    channel = await connection.channel()
    await channel.declare_exchange(protocol.PRESENCE_EXCHANGE, "fanout")
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    request = uuid.uuid4().hex
    answers = _Answers()

    def on_answer(_ch: Any, _method: Basic.Deliver, props: BasicProperties,
                  body: bytes) -> None:
        if props.type != protocol.PRESENCE_TYPE or props.correlation_id != request:
            return  # an answer to another request of this queue cannot come; be strict
        try:
            answer = codec.decode(body, props.content_type, props.content_encoding)
        except CodecError as exc:
            answers.leave_out(str(exc))
            return
        answers.take(answer)

    await channel.consume(queue, on_answer, auto_ack=True, exclusive=True)
    channel.publish(protocol.PRESENCE_EXCHANGE, "", b"", BasicProperties(
        type=protocol.PRESENCE_REQUEST_TYPE, reply_to=queue, correlation_id=request,
        delivery_mode=1))
    channel.flush()
    await asyncio.sleep(window)  # a window, not a poll: every worker answers at most once
    await channel.close()
    answers.log()
    return sorted(answers.workers, key=_host_and_pid)


def _host_and_pid(answer: dict[str, Any]) -> tuple[str, int]:
    return answer.get("host") or "", answer.get("pid") or 0


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _are_texts(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


#: The presence map's fields (docs/PROTOCOL.md, section 12) and what each must be, None
#: (unknown) always allowed. The answers come from anyone who may bind a queue to
#: crew.presence: other keys are left out (readers ignore keys they do not know).
_FIELDS: dict[str, Callable[[object], bool]] = {
    "v": validation.is_count, "worker": _is_text, "host": _is_text, "pid": validation.is_count,
    "version": _is_text, "tasks": _are_texts, "queue_type": _is_text,
    "max_priority": validation.is_count, "concurrency": validation.is_count,
    "busy": validation.is_count, "waiting": validation.is_count, "stuck": validation.is_count,
    "max_stuck": validation.is_count, "started": validation.is_count,
    "uptime": validation.is_number, "at": validation.is_count}
#: The fields of each of its ``calls``.
_CALL_FIELDS: dict[str, Callable[[object], bool]] = {
    "task": _is_text, "correlation_id": _is_text, "caller": _is_text, "state": _is_text,
    "received": validation.is_count, "elapsed": validation.is_number,
    "deadline": validation.is_count}


class _Answers:
    """The answers to one presence request, checked as they come: a field of the wrong
    kind becomes None (shown as unknown); a call that is not a map, and an answer that is
    not a worker's map, are left out. A worker answers once: a second answer with its id is
    forged (the ids are on crew.figures), or the first is; both are kept, since neither can
    be told from the other. What was not read is logged once, at the end."""

    def __init__(self) -> None:
        self.workers: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._left_out: list[str] = []
        self._unreadable: list[str] = []

    def leave_out(self, why: str) -> None:
        self._left_out.append(why)

    def take(self, answer: object) -> None:
        if not isinstance(answer, dict) or not isinstance(answer.get("worker"), str):
            self.leave_out("not a worker's presence map")
            return
        bad: set[str] = set()
        worker = _fields(answer, _FIELDS, bad)
        if isinstance(answer.get("calls"), list):
            worker["calls"] = [_fields(call, _CALL_FIELDS, bad, "calls.")
                               for call in answer["calls"] if isinstance(call, dict)]
            if len(worker["calls"]) < len(answer["calls"]):
                bad.add("calls")
        else:
            worker["calls"] = None
            bad.update(() if answer.get("calls") is None else ("calls",))
        if worker["worker"] in self._names:
            bad.add("answered twice")
        if bad:
            self._unreadable.append(f"{worker['worker'][:40]!r} ({', '.join(sorted(bad))})")
        self._names.add(worker["worker"])
        self.workers.append(worker)

    def log(self) -> None:
        if not self._left_out and not self._unreadable:
            return
        more = len(self._unreadable) - 5
        log.warning("presence answers not as docs/PROTOCOL.md (section 12) says, forged or "
                    "of another program: %d left out%s; fields shown as unknown: %s%s",
                    len(self._left_out),
                    f" ({self._left_out[0]}, ...)" if self._left_out else "",
                    "; ".join(self._unreadable[:5]) or "none",
                    f" and {more} more worker(s)" if more > 0 else "")


def _fields(raw: dict[Any, Any], kinds: dict[str, Callable[[object], bool]], bad: set[str],
            prefix: str = "") -> dict[str, Any]:
    """The fields of ``raw`` named in ``kinds``, each None unless it is there and of its
    kind (its name, after ``prefix``, then added to ``bad`` if it is there)."""
    kept: dict[str, Any] = {}
    for key, is_kind in kinds.items():
        value = raw.get(key)
        kept[key] = value if value is None or is_kind(value) else None
        if kept[key] is not value:
            bad.add(prefix + key)
    return kept


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
            serving.setdefault(task, []).append(worker)
    for task in named:
        serving.setdefault(task, [])
    figures = await queue_figures(connection, sorted(serving))
    tasks = []
    for task, its_workers in sorted(serving.items()):
        counts = figures[task]
        told = next((w for w in its_workers if w.get("queue_type") is not None), {})
        tasks.append({
            "task": task, "queue": protocol.task_queue(task), "exists": counts is not None,
            "messages": counts[0] if counts else None, "consumers": counts[1] if counts else None,
            "queue_type": told.get("queue_type"), "max_priority": told.get("max_priority"),
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
    """Columns padded to their widest cell; None shows as ``-``; a character that is not
    printable (a line break, a terminal's escape: a worker's answer may be forged) as its
    Python escape."""
    cells = [headers] + [[_cell(cell) for cell in row] for row in rows]
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
         f"{_cell(w.get('busy'))}/{_cell(w.get('concurrency'))}", w.get("stuck"),
         _duration(w.get("uptime")), _joined(w.get("tasks"))]
        for w in report["workers"]])
    return (f"{tasks}\n\n{workers}\n{len(report['workers'])} worker(s) answered")


def inspect_table(workers: list[dict[str, Any]]) -> str:
    """``crew inspect``, readable: one line per call, under its worker."""
    now_ms = protocol.now_ms()
    rows = [[w.get("worker"), c.get("task"), c.get("correlation_id"), c.get("caller"),
             c.get("state"), _duration(c.get("elapsed")),
             _duration((c["deadline"] - now_ms) / 1000) if c.get("deadline") is not None
             else None]
            for w in workers for c in w.get("calls") or ()]
    calls = table(["WORKER", "TASK", "CORRELATION ID", "CALLER", "STATE", "ELAPSED",
                   "DEADLINE IN"], rows)
    return f"{calls}\n{len(rows)} call(s) on {len(workers)} worker(s)"


def _cell(value: object) -> str:
    text = "-" if value is None else str(value)
    return text if text.isprintable() else repr(text)[1:-1]


def _joined(tasks: list[str] | None) -> str | None:
    return None if tasks is None else ", ".join(tasks)


def _duration(seconds: Any) -> str | None:
    if not validation.is_number(seconds):
        return None
    if abs(seconds) < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.0f}m" if abs(seconds) < 7200 else f"{seconds / 3600:.0f}h"
