"""What the dashboard shows (crew.board), from figures messages as workers publish them:
rates and percentiles over the window, workers, running calls, failures; and what it does
with maps that are not a worker's."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import pytest

from crew import board as boards
from crew.board import Board
from crew.windows import quantile
from crew.metrics import BUCKETS
from tests.support.hostile import HUGE, at_stack_depth, deep

NOW_MS = 1_800_000_000_000


def histogram(**at: int) -> list[int]:
    """Counts per bucket: ``at={"0.01": 3}`` puts 3 in the bucket whose bound is 0.01."""
    counts = [0] * (len(BUCKETS) + 1)
    for bound, count in at.items():
        counts[BUCKETS.index(float(bound.replace("_", ".")))] = count
    return counts


def figures_map(worker: str = "w1", *, uptime: float = 1000.0, tasks: Any = None,
                figures: Any = None, **more: Any) -> dict[str, Any]:
    return {"v": 1, "worker": worker, "host": "h", "pid": 7, "version": "0.1.0",
            "tasks": ["a", "b"] if tasks is None else tasks, "concurrency": 4, "busy": 1,
            "stuck": 0, "uptime": uptime, "interval": 2.0, "stopping": False,
            "buckets": list(BUCKETS), "figures": figures or {}, "calls": [], "failures": [],
            **more}


def task_figures(ok: int, errors: int = 0, run: list[int] | None = None) -> dict[str, Any]:
    return {"outcomes": {"ok": ok, "remote_error": errors}, "run": run or [0] * 19,
            "run_sum": 0.0, "wait": [0] * (len(BUCKETS) + 1), "wait_sum": 0.0}


def rows(view: dict[str, Any], key: str, name: str) -> dict[str, dict[str, Any]]:
    return {row[name]: row for row in view[key]}


def test_rates_and_percentiles_come_from_two_snapshots_summed_over_workers():
    board = Board()
    for worker in ("w1", "w2"):
        board.heard(figures_map(worker, figures={"a": task_figures(100, 1)}), now=0.0)
    assert rows(board.view(0.0, NOW_MS, {}), "tasks", "task")["a"]["rate"] is None  # one each
    board.heard(figures_map("w1", figures={"a": task_figures(
        300, 5, histogram(**{"0_01": 150, "0_1": 50}))}), now=10.0)
    board.heard(figures_map("w2", figures={"a": task_figures(
        200, 1, histogram(**{"0_01": 100}))}), now=10.0)
    a = rows(board.view(10.0, NOW_MS, {"a": (7, 2)}), "tasks", "task")["a"]
    # 200 + 100 ended in 10 s, 4 of them errors
    assert a["rate"] == pytest.approx((200 + 4 + 100) / 10)
    assert a["errors"] == 4
    assert (a["messages"], a["consumers"], a["workers"]) == (7, 2, 2)
    assert BUCKETS[BUCKETS.index(0.005)] < a["p50"] <= 0.01  # 250 of 300 within 10 ms
    assert 0.05 < a["p95"] <= 0.1
    b = rows(board.view(10.0, NOW_MS, {}), "tasks", "task")["b"]
    assert b["rate"] == 0 and b["p50"] is None  # served, never called


def test_a_new_worker_counts_from_its_start_and_the_window_slides():
    board = Board(window=60.0)
    board.heard(figures_map(uptime=5.0, figures={"a": task_figures(50)}), now=100.0)
    assert rows(board.view(100.0, NOW_MS, {}), "tasks", "task")["a"]["rate"] == 10.0
    for second in range(102, 200, 2):  # 10 calls a second, every 2 s, for 100 s
        board.heard(figures_map(figures={"a": task_figures(50 + 10 * (second - 100))}),
                    now=float(second))
    a = rows(board.view(198.0, NOW_MS, {}), "tasks", "task")["a"]
    assert a["rate"] == pytest.approx(10.0)


def test_quantile_interpolates_within_buckets_like_prometheus():
    bounds = [1.0, 2.0, 4.0]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == 0.5
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == 1.5
    assert quantile(0.95, bounds, [0, 0, 10, 0]) == pytest.approx(3.9)
    assert quantile(0.99, bounds, [0, 0, 0, 10]) == 4.0  # past every bound: the last


def test_workers_calls_and_failures():
    board = Board()
    call = {"task": "a", "correlation_id": "c.1", "caller": "q", "state": "running",
            "elapsed": 3.0, "deadline": NOW_MS + 7000}
    failure = {"task": "a", "correlation_id": "c.0", "at": NOW_MS - 1000, "outcome": "killed",
               "type": "JobKilled", "message": "late", "traceback": "tb"}
    board.heard(figures_map("w1", calls=[call], failures=[failure]), now=50.0)
    board.heard(figures_map("w2", host="other"), now=50.0)
    view = board.view(51.0, NOW_MS, {})
    workers = rows(view, "workers", "worker")
    assert workers["w1"]["busy"] == 1 and workers["w1"]["concurrency"] == 4
    assert workers["w1"]["seen"] == 1.0 and workers["w1"]["stale"] is False
    assert view["calls"] == [{"task": "a", "correlation_id": "c.1", "worker": "w1",
                              "state": "running", "elapsed": 4.0, "deadline": 7.0}]
    assert view["failures"] == [{**failure, "worker": "w1"}]
    assert board.find_call("c.1") == call and board.find_call("c.2") is None
    assert rows(board.view(57.0, NOW_MS, {}), "workers", "worker")["w1"]["stale"] is True
    assert board.view(50.0 + boards.FORGET_AFTER + 1, NOW_MS, {})["workers"] == []


def test_a_stopping_worker_is_forgotten_at_once():
    board = Board()
    board.heard(figures_map("w1"), now=0.0)
    board.heard(figures_map("w1", stopping=True), now=1.0)
    assert board.view(1.0, NOW_MS, {})["workers"] == []


def test_dead_letters_count_as_expired_or_delivery_limit_within_the_window():
    board = Board(window=60.0)
    board.dead_lettered("gone", "expired", now=0.0)
    board.dead_lettered("gone", "expired", now=30.0)
    board.dead_lettered("gone", "delivery_limit", now=30.0)
    assert board.tasks() == ["gone"]
    gone = rows(board.view(40.0, NOW_MS, {"gone": None}), "tasks", "task")["gone"]
    assert (gone["expired"], gone["delivery_limit"], gone["messages"]) == (2, 1, None)
    later = rows(board.view(70.0, NOW_MS, {}), "tasks", "task")["gone"]
    assert later["expired"] == 1


@pytest.mark.parametrize("junk", [
    None, "text", 42, [], {"worker": 5}, {"no": "worker"},
])
def test_a_message_that_is_not_a_workers_map_is_refused(junk):
    board = Board()
    assert board.heard(junk, now=0.0) is False
    assert board.view(0.0, NOW_MS, {})["workers"] == []


def test_a_map_with_wrong_types_inside_still_gives_a_view():
    board = Board()
    hostile = figures_map("w1", tasks=["a", 3, None], buckets="nope", uptime="x",
                          calls=["x", {"correlation_id": 5}, {"correlation_id": "c", "elapsed":
                                                              "soon", "deadline": None}],
                          failures=[1, {"at": "yesterday"}],
                          figures={"a": {"outcomes": "many", "run": [1, 2]}, 5: 6})
    assert board.heard(hostile, now=0.0)
    board.heard({**hostile, "figures": {"a": {"outcomes": {"ok": "x"}, "run": None}}}, now=2.0)
    view = board.view(2.0, NOW_MS, {})
    assert [row["task"] for row in view["tasks"]] == ["a"]
    assert [call["correlation_id"] for call in view["calls"]] == ["c"]
    assert len(view["failures"]) == 1


def test_what_a_board_keeps_is_bounded(monkeypatch):
    monkeypatch.setattr(boards, "MAX_WORKERS", 3)
    board = Board()
    assert [board.heard(figures_map(f"w{i}"), now=0.0) for i in range(5)] == [
        True, True, True, False, False]
    calls = [{"correlation_id": f"c{i}", "elapsed": i} for i in range(boards.MAX_CALLS + 10)]
    board.heard(figures_map("w0", calls=calls), now=0.0)
    view = board.view(0.0, NOW_MS, {})
    assert len(view["calls"]) == boards.MAX_CALLS
    assert view["calls"][0]["correlation_id"] == f"c{boards.MAX_CALLS + 9}"  # longest first


def test_a_task_stays_listed_after_its_workers_went_until_its_queue_goes():
    board = Board()
    board.heard(figures_map("w1", tasks=["lonely"]), now=0.0)
    late = 1.0 + boards.FORGET_AFTER
    lonely = rows(board.view(late, NOW_MS, {"lonely": (12, 0)}), "tasks", "task")["lonely"]
    assert (lonely["messages"], lonely["consumers"], lonely["workers"]) == (12, 0, 0)
    assert board.tasks() == ["lonely"]
    board.queue_gone("lonely")
    assert board.tasks() == []
    board.heard(figures_map("w2", tasks=["kept"]), now=0.0)
    board.forget_old(1.0 + boards.KEEP_TASKS)
    assert board.tasks() == []


def test_hostile_sizes_and_types_are_cut_in_the_view():
    board = Board()
    huge = "x" * 100_000
    board.heard(figures_map("w1", host=huge, version=["no"], tasks="abc", busy="many",
                            calls=[{"correlation_id": "c", "task": huge, "state": {}}],
                            failures=[{"traceback": huge, "message": huge, "type": 5,
                                       "at": "then"}]), now=0.0)
    view = board.view(0.0, NOW_MS, {})
    [worker] = view["workers"]
    assert len(worker["host"]) == 255 and worker["version"] == "" and worker["busy"] == 0
    assert view["tasks"] == []  # "abc" is no list of tasks: not a, b and c
    assert len(view["calls"][0]["task"]) == 200 and view["calls"][0]["state"] == ""
    [failure] = view["failures"]
    assert len(failure["traceback"]) == 4000 and len(failure["message"]) == 1000
    assert failure["type"] == "" and failure["at"] == 0


def test_a_flood_of_dead_letters_is_counted_in_slots_not_kept_one_by_one():
    board = Board(window=60.0)
    for number in range(100_000):
        board.dead_lettered("flooded", "expired", now=10.0 + number / 10_000)
    assert sum(len(counts) for _, counts in board._dead) <= 6  # a counter per 2 s slot
    flooded = rows(board.view(20.0, NOW_MS, {}), "tasks", "task")["flooded"]
    assert flooded["expired"] == 100_000
    assert rows(board.view(100.0, NOW_MS, {}), "tasks", "task").get("flooded") is None


#: Fields of a figures map, each made anew for each message (as each is decoded anew).
HOSTILE = {
    "uptime": lambda: {"uptime": HUGE}, "uptime-negative": lambda: {"uptime": -HUGE},
    "pid": lambda: {"pid": HUGE}, "busy": lambda: {"busy": HUGE},
    "interval": lambda: {"interval": -HUGE},
    "bucket": lambda: {"buckets": [0.1, HUGE], "figures": {"a": task_figures(1, run=[0, 1, 0])}},
    "bucket-nan": lambda: {"buckets": [math.nan], "figures": {"a": task_figures(1, run=[0, 1])}},
    "bucket-inf": lambda: {"buckets": [0.1, math.inf],
                           "figures": {"a": task_figures(1, run=[0, 1, 0])}},
    "call": lambda: {"calls": [{"correlation_id": "c", "deadline": HUGE, "elapsed": -HUGE}]},
    "failure": lambda: {"failures": [{"at": HUGE}]}, "host-deep": lambda: {"host": deep(990)},
    "count": lambda: {"figures": {"a": task_figures(HUGE)}},
    "histogram": lambda: {"figures": {"a": task_figures(1, run=[HUGE] + [0] * 18)}},
    "histogram-deep": lambda: {"figures": {"a": {**task_figures(1), "run": deep(990)}}},
}


@pytest.mark.parametrize("name", HOSTILE)
def test_numbers_past_floats_and_lists_nested_past_the_stack_neither_raise_nor_leak(name):
    """Each of these raised in pika's callback (closing the dashboard's connection) or in
    the view (ending the watcher's loop): OverflowError, RecursionError; NaN in a view is
    JSON that the page cannot parse."""
    board = Board()
    board.heard(figures_map("w1", figures={"a": task_figures(0)}), now=0.0)
    for now in (2.0, 4.0):  # what grew is counted; the third is compared with the second
        hostile = figures_map("w1", **{"figures": {"a": task_figures(1)}, **HOSTILE[name]()})
        assert at_stack_depth(100, functools.partial(board.heard, hostile, now=now))
    view = at_stack_depth(100, lambda: board.view(4.0, NOW_MS, {}))
    json.dumps(view, allow_nan=False)
    assert [worker["worker"] for worker in view["workers"]] == ["w1"]
