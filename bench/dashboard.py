"""What the dashboard costs its process at scale: ``python bench/dashboard.py [--workers N]
[--tasks M] [--active F]`` (defaults 30, 300 and 1: every worker serves every task and is
called on each between two reports, the worst case).

The board (crew/board.py) hears one figures message per worker every 2 s and makes a view
every refresh; this times, on synthetic maps shaped as workers publish them, a worker's
message decoded and heard, and one view made and turned into JSON, with the window full
(30 messages per worker). No broker: it measures crew's own work only. The page's
rendering of such a view is measured in a browser by tests/broker/test_dashboard_browser.py.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import common  # noqa: F401  (puts the repository on sys.path)

from crew import codec
from crew.board import Board
from crew.metrics import BUCKETS


def figures_map(worker: int, tasks: list[str], calls_so_far: int, at: float,
                active: float) -> dict:
    rng = random.Random(worker)
    figures = {}
    for index, task in enumerate(tasks):
        ok = (calls_so_far if index < active * len(tasks) else 0) + rng.randrange(100)
        run = [0] * (len(BUCKETS) + 1)
        run[rng.randrange(3, 9)] = ok
        figures[task] = {"outcomes": {"ok": ok, "remote_error": ok // 50}, "run": run,
                         "run_sum": ok * 0.01, "wait": list(run), "wait_sum": ok * 0.001}
    calls = [{"task": rng.choice(tasks), "correlation_id": f"{worker}.{n}", "caller": "q",
              "state": "running", "received": 0, "elapsed": 1.0, "deadline": 0}
             for n in range(8)]
    return {"v": 1, "worker": f"w{worker:04d}", "host": f"host{worker % 5}", "pid": worker,
            "version": "0.1.0", "tasks": tasks, "concurrency": 8, "busy": 8, "waiting": 0,
            "stuck": 0, "uptime": 3600.0, "at": int(at * 1000), "interval": 2.0,
            "stopping": False, "buckets": list(BUCKETS), "figures": figures, "calls": calls,
            "failures": [{"task": tasks[0], "correlation_id": f"{worker}.f", "at": 0,
                          "outcome": "remote_error", "type": "ValueError", "message": "x",
                          "traceback": "Traceback...\n" * 40}] * 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--active", type=float, default=1.0,
                        help="the share of tasks called between two reports (default 1: all)")
    options = parser.parse_args()
    tasks = [f"service{n // 20}.task{n}" for n in range(options.tasks)]
    board, heard, views, size = Board(), [], [], 0
    for tick in range(31):  # a full 60 s window of 2 s reports
        now = 1000.0 + 2 * tick
        for worker in range(options.workers):
            body = codec.serialize(figures_map(worker, tasks, 10 * tick, now, options.active))
            started = time.perf_counter()
            board.heard(codec.decode(body, "application/msgpack"), now)
            heard.append(time.perf_counter() - started)
        started = time.perf_counter()
        text = json.dumps(board.view(now, int(now * 1000), {t: (0, 1) for t in tasks}),
                          separators=(",", ":"))
        views.append(time.perf_counter() - started)
        size = len(text)
    print(f"{options.workers} workers x {options.tasks} tasks, {options.active:.0%} called, "
          f"message {len(body)} bytes")
    print(f"  a worker's message decoded and heard: median {statistics.median(heard) * 1e3:.2f}"
          f" ms (per 2 s: {statistics.median(heard) * options.workers * 1e3:.1f} ms)")
    print(f"  a view made and turned into JSON ({size} bytes): median "
          f"{statistics.median(views) * 1e3:.1f} ms, max {max(views) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
