"""Where crew's time goes: py-spy on the crew worker and the crew client under one workload.

::

    pip install py-spy
    python bench/profile_crew.py seq          # 100-byte calls, one at a time
    python bench/profile_crew.py inflight     # 100-byte calls, 64 in flight
    python bench/profile_crew.py random|text  # 1 MB calls, one at a time
    python bench/profile_crew.py gateway      # crew.gateway under HTTP load (wrk if present)
    python bench/profile_crew.py inflight --patches arena,nogzip   # bench/experiments.py

Starts a ``crew.Worker`` (concurrency 64) and a ``crew.Client`` caller (transient calls) as
in ``bench/run.py`` and samples both with ``py-spy record`` (every thread that py-spy finds
running). Samples whose innermost frame is a wait (the loop in ``epoll``, a job thread in
its queue's ``get``) are counted apart as *waiting*: a thread just woken there is runnable
but waits for the GIL, so their share shows the cost of handing work between threads. The
rest, *busy*, are listed by area (crew's modules, pika, asyncio, msgpack, ...) and by
function, on top of the stack (self) and anywhere in it (total). The raw stacks stay in
``--out`` (default a temporary directory). py-spy needs ptrace rights: root, or
``kernel.yama.ptrace_scope = 0``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import common
import http_load
import pika
import run
from common import BENCH, READY, URL

from crew import protocol

#: Calls per workload: about 10 s each on a 2-core machine.
CALLS = {"seq": 10_000, "inflight": 40_000, "random": 600, "text": 200, "gateway": 10}
#: For ``gateway``: seconds of HTTP load and concurrent connections.
HTTP_CONNECTIONS = 32

#: Areas of the code, by the file a frame is in (first match wins).
AREAS = [
    ("crew client", r"crew/(client|link|pending|parallel|pubsub)\.py"),
    ("crew worker", r"crew/worker\.py"),
    ("crew jobs/threads", r"crew/(jobs|pool|threads|context)\.py"),
    ("crew codec", r"crew/codec\.py"), ("crew protocol", r"crew/protocol\.py"),
    ("crew amqp", r"crew/amqp\.py"), ("crew other", r"crew/"),
    ("pika frames/spec", r"pika/(frame|spec|data|amqp_object)\.py"),
    ("pika channel/connection", r"pika/(channel|connection|callback)\.py"),
    ("pika I/O adapter", r"pika/adapters/"), ("pika other", r"pika/"),
    ("asyncio", r"asyncio/"), ("selectors", r"selectors\.py"),
    ("threading/queue", r"(threading|queue)\.py"), ("msgpack", r"msgpack"),
    ("zlib/gzip", r"zlib|gzip"), ("benchmark", r"bench/"), ("uuid", r"uuid\.py"),
]


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def area(frame: str) -> str:
    for name, pattern in AREAS:
        if re.search(pattern, frame):
            return name
    return "other (stdlib, C)"


def function(frame: str) -> str:
    """``name (file:line)`` without the line: samples of a function add up."""
    return re.sub(r":\d+\)$", ")", frame)


def waits() -> re.Pattern[str]:
    """Innermost frames that are waits: the loop's ``select``, an idle job thread's
    ``wake.acquire()`` in ``JobThreads._serve``."""
    jobs = (common.ROOT / "crew" / "pool.py").read_text(encoding="utf-8").splitlines()
    get_lines = [str(n) for n, line in enumerate(jobs, 1)
                 if line.strip() == "wake.acquire()" and n > 1
                 and "def _serve" in "".join(jobs[max(0, n - 15):n])]
    return re.compile(r"^(EpollSelector\.select \(|_worker \(concurrent/futures/thread\.py|"
                      r"Condition\.wait \(|"
                      rf"JobThreads\._serve \(crew/pool\.py:({'|'.join(get_lines) or '0'})\))")


def summarize(path: Path, title: str, top: int) -> None:
    stacks = parse(path)
    waiting_pattern = waits()
    waiting: Counter[str] = Counter()
    busy_stacks = []
    for frames, count in stacks:
        if waiting_pattern.search(frames[-1]):
            waiting[function(frames[-1])] += count
        else:
            busy_stacks.append((frames, count))
    total = sum(count for _, count in busy_stacks)
    if not total:
        print(f"{title}: no samples")
        return
    by_area: Counter[str] = Counter()
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    for frames, count in busy_stacks:
        leaf = frames[-1]
        by_area[area(leaf)] += count
        own[function(leaf)] += count
        for name in {function(f) for f in frames}:
            anywhere[name] += count
    print(f"\n== {title}: {total} busy samples; waiting (runnable, not running) "
          f"{sum(waiting.values())}: " + ", ".join(f"{n} {c}" for n, c in waiting.most_common()))
    print("busy, by area (top of stack):")
    for name, count in by_area.most_common():
        print(f"  {100 * count / total:5.1f} %  {name}")
    print(f"top {top} functions, self:")
    for name, count in own.most_common(top):
        print(f"  {100 * count / total:5.1f} %  {name}")
    print(f"top {top} functions, total (self and callees):")
    skip = re.compile(r"^(<module>|run |_run |Thread\.|run_forever|run_until_complete|"
                      r"Runner\.run|_bootstrap|BaseEventLoop\._run_once|Handle\._run|"
                      r"process \d+|thread )")
    shown = 0
    for name, count in anywhere.most_common():
        if skip.search(name):
            continue
        print(f"  {100 * count / total:5.1f} %  {name}")
        shown += 1
        if shown == top:
            break


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=sorted(CALLS))
    parser.add_argument("--calls", type=int,
                        help="calls to make (gateway: seconds of load; default about 10 s)")
    parser.add_argument("--patches", default="", help="bench/experiments.py patches")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--out", type=Path, help="where the raw stacks go")
    parser.add_argument("--gil", action="store_true",
                        help="only the GIL holder's stacks (py-spy --gil; on CPython 3.11 it "
                             "also reports the last holder while nobody holds it)")
    options = parser.parse_args()
    if not shutil.which("py-spy"):
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    out = options.out or Path(tempfile.mkdtemp(prefix="crew-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    task, spin = f"bench-{run_id}-profile-echo", f"bench-{run_id}-profile-spin"
    patches = [p for p in options.patches.split(",") if p]
    worker_orders = {"task": task, "spin": spin, "concurrency": common.PREFETCH,
                     "patches": patches}
    caller_orders = {"task": task, "persistent": False, "warmup": 200, "patches": patches,
                     "workload": options.workload,
                     "calls": options.calls or CALLS[options.workload]}
    name = options.workload + (f"+{'+'.join(patches)}" if patches else "")
    worker_stacks, client_stacks = out / f"{name}-worker.txt", out / f"{name}-client.txt"
    spy = ["py-spy", "record", "--format", "raw", "--rate", str(options.rate), "--nonblocking"]
    if options.gil:
        spy.append("--gil")
    started: list[subprocess.Popen[str]] = []
    spies: list[subprocess.Popen[bytes]] = []

    def start(module: str, role: str, orders: dict[str, object]) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(BENCH / module), role, json.dumps(orders)],
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        if proc.stdout.readline().strip() != READY:  # type: ignore[union-attr]
            raise RuntimeError(f"{module} {role} did not start")
        return proc

    def spy_on(proc: subprocess.Popen[str], output: Path) -> None:
        spies.append(subprocess.Popen(spy + ["--output", str(output), "--pid", str(proc.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        spy_on(start("crew_rpc.py", "worker", worker_orders), worker_stacks)
        if options.workload == "gateway":
            port = run.free_port()
            spy_on(start("http_load.py", "serve", {"mode": "gateway", "port": port,
                                                   "patches": patches}), client_stacks)
            print(http_load.run_load(port, f"/call/{task}", HTTP_CONNECTIONS,
                                     options.calls or CALLS["gateway"]))
        else:
            subprocess.run(spy + ["--output", str(client_stacks), "--", sys.executable,
                                  str(BENCH / "crew_rpc.py"), "caller",
                                  json.dumps(caller_orders)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(15)
    for spying in spies:
        spying.wait(30)
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    channel = connection.channel()
    for queue in (task, spin):
        channel.queue_delete(protocol.task_queue(queue))
    connection.close()
    print(f"raw stacks in {out}")
    summarize(worker_stacks, f"worker, {name}", options.top)
    summarize(client_stacks, f"{'gateway' if options.workload == 'gateway' else 'client'}, "
                             f"{name}", options.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
