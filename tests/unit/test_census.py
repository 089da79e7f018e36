"""``crew status``, ``inspect`` and ``cancel`` given forged presence answers, without a
broker: anyone who may bind a queue to ``crew.presence`` learns the asker's reply queue and
can answer it (docs/PROTOCOL.md, section 12). A fake channel hands crew.census's
``gather`` each answer as pika would, at a callback's stack depth; the broker test is
tests/broker/test_command.py."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import sys
from typing import Any

import msgpack
import pytest
from pika.spec import Basic, BasicProperties

from crew import protocol
from crew.census import find_call, gather, inspect_table, status, status_tables
from tests.support.hostile import HUGE, at_stack_depth, deep

#: When the maps are made: set anew for each test (below), since inspect shows a deadline's
#: distance from the moment it runs (maps made at import were minutes old in a long run).
NOW_MS = protocol.now_ms()


@pytest.fixture(autouse=True)
def _now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "NOW_MS", protocol.now_ms())


def worker_map(worker: str, host: str, task: str, call: str) -> dict[str, Any]:
    """A presence map as crew.presence makes it, at NOW_MS."""
    return {"v": 1, "worker": worker, "host": host, "pid": 4242, "version": "0.1.0",
            "tasks": [task], "queue_type": "classic", "max_priority": 10, "concurrency": 2,
            "busy": 1, "waiting": 0, "stuck": 0, "max_stuck": 3, "started": NOW_MS - 300_000,
            "uptime": 300.0, "at": NOW_MS, "calls": [
                {"task": task, "correlation_id": call, "caller": "amq.gen-" + call,
                 "state": "running", "received": NOW_MS - 1500, "elapsed": 1.5,
                 "deadline": NOW_MS + 600_000}]}


REAL = "r" * 32
FORGED = "f" * 32


def real() -> dict[str, Any]:
    return worker_map(REAL, "real-host", "a", "c.real")


def forged(**fields: Any) -> dict[str, Any]:
    return {**worker_map(FORGED, "forged-host", "f", "c.forged"), **fields}


def forged_call(**fields: Any) -> dict[str, Any]:
    answer = forged()
    answer["calls"] = [{**answer["calls"][0], **fields}]
    return answer


def encoded(answer: Any) -> tuple[bytes, str]:
    """msgpack, or JSON for what msgpack cannot carry (integers past 64 bits)."""
    try:
        return msgpack.packb(answer), protocol.MSGPACK
    except (OverflowError, TypeError):
        return json.dumps(answer).encode(), protocol.JSON


class FakeChannel:
    """What gather and queue_figures use of a channel: every answer is delivered as soon
    as the request is published; every task queue holds 4 calls for 1 consumer."""

    is_open = True

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.on_answer: Any = None

    async def declare_exchange(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    async def declare_queue(self, *_args: Any, **_kwargs: Any) -> str:
        return "amq.gen-asker"

    async def consume(self, _queue: str, callback: Any, **_kwargs: Any) -> None:
        self.on_answer = callback

    def publish(self, _exchange: str, _key: str, _body: bytes, props: BasicProperties) -> None:
        for answer in self.answers:
            body, content_type = encoded(answer)
            answer_props = BasicProperties(type=protocol.PRESENCE_TYPE, content_type=content_type,
                                           correlation_id=props.correlation_id)
            at_stack_depth(100, functools.partial(
                self.on_answer, None, Basic.Deliver(), answer_props, body))

    def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def queue_counts(self, _queue: str) -> tuple[int, int]:
        return 4, 1


class FakeConnection:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    async def channel(self) -> FakeChannel:
        return FakeChannel(self.answers)


def commands(*answers: Any) -> dict[str, Any]:
    """What crew status (readable and --json), crew inspect and crew cancel make of
    ``answers``, each decoded anew."""
    async def run() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        report = await status(FakeConnection(list(answers)), 0)  # type: ignore[arg-type]
        workers = await gather(FakeConnection(list(answers)), 0)  # type: ignore[arg-type]
        return report, workers

    report, workers = asyncio.run(run())
    json.dumps(report, allow_nan=False)  # crew status --json
    json.dumps([{"worker": w.get("worker"), "calls": w.get("calls") or []} for w in workers],
               allow_nan=False)  # crew inspect --json
    return {"report": report, "status": status_tables(report).splitlines(),
            "inspect": inspect_table(workers).splitlines(),
            "cancel": find_call(workers, "c.real")}


def rows(lines: list[str], worker: str) -> list[list[str]]:
    """The cells of ``worker``'s rows (the columns' widths depend on the other rows)."""
    return [line.split() for line in lines if line.startswith(worker)]


@pytest.fixture
def baseline() -> dict[str, Any]:
    """What the commands make of the real worker's answer alone, made in the test."""
    return commands(real())

#: Values no field of the map may have, each made anew (as each answer is decoded anew).
VALUES = {"huge": lambda: HUGE, "-huge": lambda: -HUGE, "nan": lambda: math.nan,
          "inf": lambda: math.inf, "deep": lambda: deep(990), "bytes": lambda: b"\xff\x00",
          "map": lambda: {b"k": [1]}, "text": lambda: "x", "int": lambda: 5, "bool": lambda: True,
          "texts": lambda: ["x"], "ints": lambda: [5, deep(990)]}
FIELDS = list(worker_map("w", "h", "t", "c"))
CALL_FIELDS = list(worker_map("w", "h", "t", "c")["calls"][0])
#: What a forged worker's row must not show: the forged values, written out.
SHOWN = ("nan", "inf", "[[", "b'", "{", "1000000000", "True")

CASES = {
    **{f"{field}={value}": lambda f=field, v=value: forged(**{f: VALUES[v]()})
       for field in FIELDS for value in VALUES},
    **{f"calls.{field}={value}": lambda f=field, v=value: forged_call(**{f: VALUES[v]()})
       for field in CALL_FIELDS for value in VALUES},
    **{f"answer={value}": VALUES[value] for value in VALUES},
    **{f"calls={value}": lambda v=value: forged(calls=[VALUES[v]()]) for value in VALUES},
    **{f"missing {field}": lambda f=field: {k: v for k, v in forged().items() if k != f}
       for field in FIELDS},
    "bytes keys": lambda: {k.encode(): v for k, v in forged().items()},
    "no str key": lambda: {b"worker": FORGED, 5.5: 1, None: 2},
    "empty map": dict,
}


@pytest.mark.parametrize("case", CASES)
def test_a_forged_answer_neither_raises_nor_changes_the_real_workers_rows(case, caplog,
                                                                         baseline):
    caplog.set_level(logging.WARNING, logger="crew.census")
    answer = CASES[case]()
    name = answer.get("worker") if isinstance(answer, dict) else None
    found = commands(answer, real())
    for command in ("status", "inspect"):
        assert rows(found[command], REAL) == rows(baseline[command], REAL), command
    assert found["cancel"] == baseline["cancel"]
    real_report = [w for w in found["report"]["workers"] if w.get("worker") == REAL]
    assert real_report == baseline["report"]["workers"]
    task_a = [t for t in found["report"]["tasks"] if t["task"] == "a"]
    assert task_a == baseline["report"]["tasks"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 2  # one per command run: status, then gather for inspect
    name = name if isinstance(name, str) else FORGED
    shown = rows(found["status"], name)
    if not shown:
        assert len(warnings) == 2, "a worker left out is logged"
    for cells in shown + rows(found["inspect"], name):
        assert not any(text in cell for cell in cells for text in SHOWN), cells


def test_unreadable_fields_show_as_unknown_and_are_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="crew.census")
    found = commands(forged(busy=math.nan, concurrency=True, uptime=math.inf, pid="7",
                            host=deep(990)), real())
    (cells,) = rows(found["status"], FORGED)
    assert cells == [FORGED, "-", "-", "0.1.0", "-/-", "0", "-", "f"]
    status_warning, inspect_warning = (record.getMessage() for record in caplog.records)
    assert status_warning == inspect_warning  # one per command
    assert FORGED in status_warning and "0 left out" in status_warning
    assert "(busy, concurrency, host, pid, uptime)" in status_warning


def test_queue_type_and_priority_come_from_a_worker_that_tells_them():
    """A forged worker listed first (its host sorts first) that serves the real task with
    an unreadable queue type does not hide the real worker's."""
    found = commands(forged(host="", tasks=["a"], queue_type=[1], max_priority=math.nan),
                     real())
    (task_a,) = [t for t in found["report"]["tasks"] if t["task"] == "a"]
    assert (task_a["queue_type"], task_a["max_priority"], task_a["workers"]) == (
        "classic", 10, 2)


def test_a_text_field_cannot_write_lines_or_escapes_into_a_table(baseline):
    found = commands(forged(host="h\n" + REAL + "  fake\x1b[2J", version="\r"), real())
    assert rows(found["status"], REAL) == rows(baseline["status"], REAL)
    (cells,) = rows(found["status"], FORGED)
    assert "\\n" in cells[1] and "\\x1b" in cells[2] and cells[4] == "\\r"


def test_a_second_answer_of_a_worker_is_shown_beside_the_first_and_logged(caplog, baseline):
    """A worker answers each request once: a second answer with its id is forged (the ids
    are published on crew.figures), or the first is. Neither hides the other."""
    caplog.set_level(logging.WARNING, logger="crew.census")
    for answers in ([real(), {**real(), "host": "forged-host", "calls": []}],
                    [{**real(), "host": "forged-host", "calls": []}, real()]):
        found = commands(*answers)
        assert rows(baseline["status"], REAL)[0] in rows(found["status"], REAL)
        assert len(rows(found["status"], REAL)) == 2
        assert found["cancel"] == baseline["cancel"]
        assert "(answered twice, calls)" not in caplog.records[-1].getMessage()
        assert f"{REAL!r} (answered twice)" in caplog.records[-1].getMessage()
