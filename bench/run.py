"""crew's benchmark (issue 7): ``python bench/run.py`` (about 17 minutes) or ``--quick``.

Measures, in one run and side by side, each system's worker in one process and its caller in
another, against the RabbitMQ at ``$BENCH_URL`` (default guest on 127.0.0.1:5672):

- **raw**: the minimal pika RPC loop, ``BlockingConnection`` on both sides, transient
  messages, prefetch 64 (``bench/raw_rpc.py``): the reference every ratio is taken to;
- **crew transient**: ``crew.Worker`` (concurrency 64, so prefetch 64) serving a plain
  ``def`` echo, ``crew.Client.call(..., persistent=False)`` (``bench/crew_rpc.py``);
- **crew default**: the same with crew's defaults (concurrency 1, persistent calls);
- **crew sync**: ``crew.SyncClient`` (issue 17) calling a worker like crew transient's,
  transient calls, from one thread (sequential) and from 64 threads at once (in flight)
  (``bench/sync_client.py``): the synchronous client against the asyncio one;
- **aio-pika**: ``aio_pika.patterns.RPC``, transient, no confirms, prefetch 64
  (``bench/aiopika_rpc.py``; skipped with a note when aio-pika is not installed:
  ``pip install -r bench/requirements.txt``).

Workloads: 2000 sequential calls of 100 bytes; 5000 calls with 64 in flight; 200 sequential
calls of 1 MB of random bytes and 200 of 1 MB of compressible text; the same two, 10 calls
each, with each process connected to the broker through a link limited to 100 Mbit/s each
way (``bench/link.py``; ``--link MBIT``, ``--no-link``), for raw, crew transient and the
``--experiment`` rows: where automatic gzip pays, as it cannot on loopback; HTTP ``POST
/call/<task>`` through ``crew.gateway`` against the same handler answering inline
(``bench/http_load.py``); how late ``TimeoutError`` and ``ExpirationError`` arrive after a
0.2 s deadline; worker and client RSS after 50 000 calls against after warm-up.

The systems run one after another, interleaved in rounds (raw, crew, ..., raw, crew, ...),
and each figure is the median of its rounds, so background load hits all alike. The
sequential workload, the most sensitive to it, is interleaved finer: in each round every
system's caller makes its calls in blocks of 100, taking turns with the others. So is the
HTTP workload: every server (and the gateways' workers) stays up for the round, and ``wrk``
loads them in bursts of 1 s, taking turns likewise (5 counted bursts each). The table
shows each figure with its ratio to raw in the same run (to the inline handler for HTTP);
``bench/results.json`` gets the same rows. Queues get a run id in their names and are all
deleted at the end. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, NamedTuple

import common
import experiments
import http_load
import link
import pika
from common import BENCH, READY, RESULT, URL, link_workload, median

from crew import protocol

#: Workload sizes of the full run and of ``--quick`` (a smoke test: no figure means much).
FULL = {"warmup": 200, "seq": 2000, "seq_block": 100, "inflight_calls": 5000, "large": 200,
        "deadline": 30, "rounds": 5, "http_seconds": 5.0, "memory_warmup": 5000,
        "memory_calls": 50_000, "link_calls": 10}
QUICK = {"warmup": 10, "seq": 20, "seq_block": 10, "inflight_calls": 128, "large": 3,
         "deadline": 2, "rounds": 1, "http_seconds": 1.0, "memory_warmup": 100,
         "memory_calls": 300, "link_calls": 2}
#: The rate of the link workload's links (Mbit/s each way): where automatic gzip pays (a
#: 1 MB call crosses four links, about 320 ms), unlike on loopback.
LINK_MBIT = 100.0
#: The systems whose 1 MB workloads also run through the link, besides the --experiment rows.
LINK_SYSTEMS = ("raw", "crew transient")
HTTP_CONNECTIONS = 32
REFERENCE = "raw"
HTTP_REFERENCE = "inline handler"
AIO_PIKA_MISSING = ("aio-pika is not installed: its rows are skipped. Install it with "
                    "`pip install -r bench/requirements.txt` (or `pip install aio-pika`).")


class Names:
    """Every queue and task name of one run, each with the run id in it."""

    def __init__(self, run_id: str) -> None:
        self.raw_queue = f"bench.raw.{run_id}"
        self.raw_confirms_queue = f"bench.raw-confirms.{run_id}"
        self.raw_crew_queue = protocol.task_queue(f"bench-{run_id}-raw")
        self.aio_queue = f"bench.aiopika.{run_id}"
        self.aio_idle = f"bench.aiopika.idle.{run_id}"
        self.run_id = run_id
        self.crew_tasks: dict[str, tuple[str, str]] = {}
        self.crew_idle = f"bench-{run_id}-idle"

    def crew(self, kind: str) -> tuple[str, str]:
        """The echo and spin tasks of one crew system."""
        return self.crew_tasks.setdefault(
            kind, (f"bench-{self.run_id}-{kind}-echo", f"bench-{self.run_id}-{kind}-spin"))

    def queues(self) -> list[str]:
        tasks = [t for pair in self.crew_tasks.values() for t in pair] + [self.crew_idle]
        # crew's workers declare the cancel stream too; it keeps its notices (and the
        # workers' markers) for 30 minutes unless deleted.
        return ([self.raw_queue, self.raw_confirms_queue, self.raw_crew_queue, self.aio_queue,
                 self.aio_idle, protocol.CANCEL_STREAM]
                + [protocol.task_queue(t) for t in tasks])


def systems(names: Names, sizes: dict[str, Any], with_aio: bool,
            patch_sets: list[list[str]], only: set[str] | None,
            experiment_deadlines: bool = False) -> dict[str, dict[str, Any]]:
    """Each system: its module, what its worker and its caller are told. ``patch_sets``
    add "crew transient +<patches>" systems (bench/experiments.py); ``only`` keeps those
    systems (and raw, the reference)."""
    common_orders = {k: sizes[k] for k in ("warmup", "inflight_calls", "large")}

    def crew_system(kind: str, concurrency: int, persistent: bool, deadline: bool,
                    patches: list[str] | None = None) -> dict[str, Any]:
        task, spin = names.crew(kind)
        return {"module": "crew_rpc.py",
                "worker": {"task": task, "spin": spin, "concurrency": concurrency,
                           "patches": patches or []},
                "caller": {**common_orders, "task": task, "spin": spin, "idle": names.crew_idle,
                           "persistent": persistent, "patches": patches or [],
                           "deadline": sizes["deadline"] if deadline else 0}}

    found = {
        "raw": {"module": "raw_rpc.py", "worker": {"queue": names.raw_queue},
                "caller": {**common_orders, "queue": names.raw_queue}},
        # What publisher confirms cost (crew uses none; see README, "what is guaranteed").
        "raw + confirms": {"module": "raw_rpc.py",
                           "worker": {"queue": names.raw_confirms_queue, "confirms": True},
                           "caller": {**common_orders, "queue": names.raw_confirms_queue,
                                      "confirms": True}},
        # The broker's share of crew's cost: raw with crew's queue arguments and properties.
        "raw + crew's queue": {"module": "raw_rpc.py",
                               "worker": {"queue": names.raw_crew_queue, "crew_queue": True},
                               "caller": {**common_orders, "queue": names.raw_crew_queue,
                                          "crew_queue": True}},
        "crew transient": crew_system("transient", common.PREFETCH, False, True),
        "crew default": crew_system("default", 1, True, False),
        # The synchronous client against crew transient's asyncio one: the same worker.
        "crew sync": {**crew_system("sync", common.PREFETCH, False, False),
                      "module": "sync_client.py"},
    }
    if with_aio:
        found["aio-pika"] = {"module": "aiopika_rpc.py", "worker": {"queue": names.aio_queue},
                             "caller": {**common_orders, "queue": names.aio_queue,
                                        "idle": names.aio_idle, "deadline": sizes["deadline"]}}
    if only is not None:
        found = {name: spec for name, spec in found.items() if name in only or name == "raw"}
    for number, patches in enumerate(patch_sets):
        found["crew transient +" + "+".join(patches)] = crew_system(
            f"x{number}", common.PREFETCH, False, experiment_deadlines, patches)
    return found


# --- child processes --------------------------------------------------------------------

@contextlib.contextmanager
def child(module: str, role: str, orders: dict[str, Any], log: IO[str],
          stdin: bool = False) -> Iterator[Any]:
    """A worker or server process (or, with ``stdin``, a caller taking turns), from the
    moment it prints READY until it is stopped."""
    proc = subprocess.Popen([sys.executable, str(BENCH / module), role, json.dumps(orders)],
                            stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    line = proc.stdout.readline()  # type: ignore[union-attr]
    watchdog.cancel()
    try:
        if line.strip() != READY:
            raise RuntimeError(f"{module} {role} did not start (see {log.name})")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def run_caller(module: str, orders: dict[str, Any], log: IO[str]) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, str(BENCH / module), "caller", json.dumps(orders)],
                          stdout=subprocess.PIPE, stderr=log, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{module} caller failed with status {done.returncode} "
                           f"(see {log.name})")
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise RuntimeError(f"{module} caller printed no result (see {log.name})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the run ----------------------------------------------------------------------------

Samples = dict[tuple[str, str, str], list[float]]


#: What went wrong, one line per failed system and round; the run goes on without them.
failures: list[str] = []
#: What a failed step raises: a child that did not start, a caller or wrk that failed or
#: timed out.
STEP_ERRORS = (RuntimeError, OSError, subprocess.SubprocessError)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Print how long ``name`` took; a failure is reported and recorded, not raised."""
    print(f"  {name} ...", end="", flush=True)
    started = time.monotonic()
    try:
        yield
    except STEP_ERRORS as exc:
        failures.append(f"{name}: {exc}")
        print(f" FAILED: {exc}", flush=True)
    else:
        print(f" {time.monotonic() - started:.0f} s", flush=True)


def rpc_round(found: dict[str, dict[str, Any]], samples: Samples, log: IO[str]) -> None:
    for system, spec in found.items():
        with step(system), child(spec["module"], "worker", spec["worker"], log) as worker:
            orders = {**spec["caller"], "worker_pid": worker.pid}
            for row in run_caller(spec["module"], orders, log):
                samples[system, row["workload"], row["figure"]].append(row["value"])
            # The 1 MB bodies leave their mark on the worker's heap.
            samples[system, "memory", "worker MiB after the workloads"].append(
                common.rss_mib(worker.pid))


def sequential_round(found: dict[str, dict[str, Any]], sizes: dict[str, Any],
                     samples: Samples, log: IO[str]) -> None:
    """The sequential workload, every system's caller taking turns: a block of
    ``sizes["seq_block"]`` calls each, in an order that rotates, until each made
    ``sizes["seq"]``. A sequential call is a chain of wake-ups whose cost moves with what the
    machine does from one second to the next; in blocks a fraction of a second apart, all
    systems meet the same machine, where one system's 2000 calls at a time, seconds after
    another's, let its ratio to raw move by 0.1 between identical runs."""
    with step("sequential, in turns"), contextlib.ExitStack() as stack:
        callers = {}
        for system, spec in found.items():
            worker = stack.enter_context(child(spec["module"], "worker", spec["worker"], log))
            orders = {**spec["caller"], "worker_pid": worker.pid}
            callers[system] = stack.enter_context(
                child(spec["module"], "turns", orders, log, stdin=True))
        for system in _rotating(list(callers), max(1, sizes["seq"] // sizes["seq_block"])):
            _command(callers[system], str(sizes["seq_block"]), "done", system)
        for system, proc in callers.items():
            for row in json.loads(_command(proc, "end", RESULT, system)[len(RESULT):]):
                samples[system, row["workload"], row["figure"]].append(row["value"])


#: Seconds a caller taking turns may take to answer one command (a block of 100 calls takes
#: well under one); past it the caller is killed, and the step fails instead of hanging.
TURN_TIMEOUT = 120


def _command(proc: Any, command: str, answer: str, system: str) -> str:
    """Send a caller taking turns a command; return its answer, which must start so."""
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    watchdog = threading.Timer(TURN_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        watchdog.cancel()
    if not line.startswith(answer):
        raise RuntimeError(f"the {system} caller taking turns answered {line.strip()!r} "
                           f"to {command!r}")
    return line.strip()


def link_round(found: dict[str, dict[str, Any]], sizes: dict[str, Any], samples: Samples,
               log: IO[str]) -> None:
    """The 1 MB workloads again, each system's worker and caller connected to the broker
    through a link of ``sizes["link_mbit"]`` each way (bench/link.py, a process of its own,
    so its CPU time is in neither's figures)."""
    mbit = sizes["link_mbit"]
    for system, spec in found.items():
        if system not in LINK_SYSTEMS and not system.startswith("crew transient +"):
            continue
        port = free_port()
        with step(f"{system}, {mbit:g} Mbit/s link"), contextlib.ExitStack() as stack:
            proxy = stack.enter_context(child("link.py", "serve", {
                "port": port, "mbit": mbit, "upstream": link.upstream(URL)}, log))
            url = link.via(URL, port)
            worker = stack.enter_context(
                child(spec["module"], "worker", {**spec["worker"], "url": url}, log))
            orders = {**spec["caller"], "url": url, "worker_pid": worker.pid, "deadline": 0,
                      "link": {"mbit": mbit, "calls": sizes["link_calls"], "pid": proxy.pid}}
            for row in run_caller(spec["module"], orders, log):
                samples[system, row["workload"], row["figure"]].append(row["value"])


#: Seconds of each burst of load of the HTTP workload in turns, and of each warm-up.
HTTP_BURST_SECONDS = 1


class HttpServer(NamedTuple):
    """One variant of the HTTP workload, up: where to load it, its processes' pids by role."""

    port: int
    path: str
    pids: dict[str, int]


def http_round(names: Names, sizes: dict[str, Any], patch_sets: list[list[str]],
               samples: Samples, log: IO[str]) -> None:
    """The HTTP workload in turns: the inline handler's server, the gateway's (and its
    worker) and one gateway per patch set (its worker and server patched alike) are all up
    together; each gets an uncounted burst of load, then they take turns, a burst of
    ``HTTP_BURST_SECONDS`` each in an order that rotates, until each had
    ``round(sizes["http_seconds"])`` (at least 1). Run seconds apart, the inline handler's
    rate moved by a third between runs while the gateway's held; bursts a second apart
    meet the same machine.

    A variant's figures for the round combine its bursts (:func:`_combine_bursts`):
    requests/s over the seconds wrk measured, errors summed, CPU time per request of the
    server and the worker over the bursts only (between its turns a variant is idle); p50
    and p99 are the medians of the bursts' own, as wrk gives percentiles, not request
    times. A variant that fails to start or in a burst sits out the rest of the round, and
    the step fails naming it; the others go on."""
    workload = f"HTTP POST /call, {HTTP_CONNECTIONS} connections"
    variants: list[tuple[str, str, str, list[str]]] = [  # system, task kind, mode, patches
        (HTTP_REFERENCE, "http", "inline", []), ("crew gateway", "http", "gateway", [])]
    variants += [("crew gateway +" + "+".join(patches), f"http-x{number}", "gateway", patches)
                 for number, patches in enumerate(patch_sets)]
    order = [system for system, *_ in variants]
    with step("http, in turns"), contextlib.ExitStack() as stack:
        servers: dict[str, HttpServer] = {}
        failed: dict[str, str] = {}
        for system, kind, mode, patches in variants:
            with _dropping(failed, system):
                # A task of its own: the workers of all the gateways are up together.
                servers[system] = _http_server(stack, names.crew(kind), mode, patches, log)
        bursts: dict[str, list[dict[str, float]]] = {system: [] for system in servers}
        for system in order:  # the warm-up
            if system not in failed:
                with _dropping(failed, system):
                    _http_burst(servers[system])
        for system in _rotating(order, max(1, round(sizes["http_seconds"]))):
            if system not in failed:
                with _dropping(failed, system):
                    bursts[system].append(_http_burst(servers[system]))
        for system, runs in bursts.items():
            if system not in failed:
                for figure, value in _combine_bursts(runs, servers[system].pids).items():
                    samples[system, workload, figure].append(value)
        if failed:
            raise RuntimeError("; ".join(f"{system}: {why}" for system, why in failed.items()))


def _http_server(stack: contextlib.ExitStack, tasks: tuple[str, str], mode: str,
                 patches: list[str], log: IO[str]) -> HttpServer:
    """Start one variant's server (``mode`` "inline" or "gateway") and, for a gateway, the
    crew worker of its echo and spin ``tasks``, until ``stack`` closes."""
    task, spin = tasks
    port = free_port()
    pids: dict[str, int] = {}
    if mode == "gateway":
        worker = {"task": task, "spin": spin, "concurrency": common.PREFETCH,
                  "patches": patches}
        pids["worker"] = stack.enter_context(child("crew_rpc.py", "worker", worker, log)).pid
    pids["server"] = stack.enter_context(child(
        "http_load.py", "serve", {"mode": mode, "port": port, "patches": patches}, log)).pid
    return HttpServer(port, f"/call/{task}", pids)


def _http_burst(server: HttpServer) -> dict[str, float]:
    """One burst of load on one variant: run_load's figures, and ``<role> CPU s``, the CPU
    seconds each of its processes spent meanwhile."""
    before = {role: common.cpu_seconds(pid) for role, pid in server.pids.items()}
    figures = http_load.run_load(server.port, server.path, HTTP_CONNECTIONS,
                                 HTTP_BURST_SECONDS)
    for role, pid in server.pids.items():
        figures[f"{role} CPU s"] = common.cpu_seconds(pid) - before[role]
    return figures


def _combine_bursts(bursts: list[dict[str, float]], roles: Iterable[str]) -> dict[str, float]:
    """One variant's figures for a round, from its bursts."""
    requests = sum(burst["requests"] for burst in bursts)
    figures = {"requests/s": requests / sum(burst["seconds"] for burst in bursts),
               # wrk prints each burst's percentiles, not its request times, so the round's
               # cannot be taken over all its requests: the median burst's stand for them.
               "p50 ms": median(burst["p50 ms"] for burst in bursts),
               "p99 ms": median(burst["p99 ms"] for burst in bursts),
               "errors": sum(burst["errors"] for burst in bursts)}
    for role in roles:
        figures[f"{role} CPU us/request"] = (
            1e6 * sum(burst[f"{role} CPU s"] for burst in bursts) / max(1, requests))
    return figures


def _rotating(order: list[str], turns: int) -> Iterator[str]:
    """``turns`` turns of everyone in ``order``, turn k starting with the k-th (mod n)."""
    for turn in range(turns):
        shift = turn % len(order)
        yield from order[shift:] + order[:shift]


@contextlib.contextmanager
def _dropping(failed: dict[str, str], system: str) -> Iterator[None]:
    """Run part of ``system``'s round; should it fail, note why in ``failed`` (the system
    then sits out the rest of the round) instead of raising."""
    try:
        yield
    except STEP_ERRORS as exc:
        failed[system] = str(exc)


def memory_phase(found: dict[str, dict[str, Any]], sizes: dict[str, Any], samples: Samples,
                 log: IO[str]) -> None:
    for system, spec in found.items():
        if system in ("crew default", "crew sync"):
            # crew default: 50 000 persistent calls one at a time, long and without a target;
            # crew sync runs crew transient's client behind a thread hop: nothing new here.
            continue
        with step(f"memory, {system}"), \
                child(spec["module"], "worker", spec["worker"], log) as worker:
            orders = {**spec["caller"], "worker_pid": worker.pid, "memory": {
                "warmup": sizes["memory_warmup"], "calls": sizes["memory_calls"]}}
            for row in run_caller(spec["module"], orders, log):
                samples[system, row["workload"], row["figure"]].append(row["value"])


def delete_queues(names: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
    finally:
        connection.close()


# --- results ----------------------------------------------------------------------------

def summarize(samples: Samples) -> list[dict[str, Any]]:
    """One row per (system, workload, figure): the median of the rounds and its ratio to
    the reference system (raw; the inline handler for HTTP) in the same run."""
    values = {key: median(runs) for key, runs in samples.items()}
    rows = []
    for (system, workload, figure), value in values.items():
        reference = HTTP_REFERENCE if workload.startswith("HTTP") else REFERENCE
        base = values.get((reference, workload, figure))
        ratio = (value / base if base and "growth" not in figure and figure != "errors"
                 else None)
        rows.append({"system": system, "workload": workload, "figure": figure,
                     "value": value, "ratio": ratio, "rounds": len(samples[system, workload,
                                                                           figure])})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Workloads down, systems across; each cell the value and its ratio to the reference."""
    systems_seen = list(dict.fromkeys(row["system"] for row in rows))
    cells = {(r["workload"], r["figure"], r["system"]): r for r in rows}
    lines = []
    for group in ("rpc", "http"):
        columns = [s for s in systems_seen
                   if any(r["system"] == s and r["workload"].startswith("HTTP") == (group == "http")
                          for r in rows)]
        keys = list(dict.fromkeys((r["workload"], r["figure"]) for r in rows
                                  if r["workload"].startswith("HTTP") == (group == "http")))
        if not keys:
            continue
        header = ["workload", "figure"] + columns
        body = []
        for workload, figure in keys:
            line = [workload, figure]
            for system in columns:
                row = cells.get((workload, figure, system))
                line.append("" if row is None else _cell(row))
            body.append(line)
        widths = [max(len(str(x[i])) for x in [header] + body) for i in range(len(header))]
        padded = (h.ljust(w) for h, w in zip(header, widths, strict=True))
        lines.append("| " + " | ".join(padded) + " |")
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for line in body:
            padded = (c.ljust(w) for c, w in zip(line, widths, strict=True))
            lines.append("| " + " | ".join(padded) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(row: dict[str, Any]) -> str:
    value = abs(row["value"])
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    text = f"{row['value']:.{digits}f}"
    return text if row["ratio"] is None else f"{text} ({row['ratio']:.2f}x)"


def targets(rows: list[dict[str, Any]], sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's targets, each with the figures it was judged on and whether it holds."""
    def get(system: str, workload: str, figure: str, key: str = "value") -> float | None:
        for row in rows:
            if (row["system"], row["workload"], row["figure"]) == (system, workload, figure):
                return row[key]
        return None

    http = f"HTTP POST /call, {HTTP_CONNECTIONS} connections"
    calls = sizes["memory_calls"]
    checks = [
        ("crew transient sequential calls/s >= 0.75x raw",
         get("crew transient", "sequential 100 B", "calls/s", "ratio"), ">=", 0.75),
        ("crew transient 64 in flight calls/s >= 0.75x raw",
         get("crew transient", "64 in flight 100 B", "calls/s", "ratio"), ">=", 0.75),
        ("crew transient 1 MB random calls/s >= 1.0x raw",
         get("crew transient", "1 MB random", "calls/s", "ratio"), ">=", 1.0),
        ("TimeoutError p99 <= 50 ms after the deadline",
         get("crew transient", "TimeoutError late", "p99 ms"), "<=", 50.0),
        ("ExpirationError p99 <= 50 ms after the deadline",
         get("crew transient", "ExpirationError late", "p99 ms"), "<=", 50.0),
        (f"crew worker RSS after {calls} calls within 10 % of after warm-up (growth %)",
         get("crew transient", "memory", "worker growth %"), "<=", 10.0),
        (f"crew client RSS after {calls} calls within 10 % of after warm-up (growth %)",
         get("crew transient", "memory", "client growth %"), "<=", 10.0),
        ("crew sync sequential calls/s >= 0.8x crew transient (issue 17)",
         _div(get("crew sync", "sequential 100 B", "calls/s"),
              get("crew transient", "sequential 100 B", "calls/s")), ">=", 0.8),
        ("crew sync 64 threads calls/s >= 0.6x crew transient 64 in flight (issue 17)",
         _div(get("crew sync", "64 in flight 100 B", "calls/s"),
              get("crew transient", "64 in flight 100 B", "calls/s")), ">=", 0.6),
        ("gateway HTTP requests/s >= 0.5x the inline handler",
         get("crew gateway", http, "requests/s", "ratio"), ">=", 0.5),
    ]
    mbit = sizes.get("link_mbit")
    if mbit:
        # Where automatic gzip pays. On loopback it cannot (1 MB of text is slower than random
        # there, as on any fast network): that target was withdrawn in issue 14.
        checks.append((
            f"(link) crew transient 1 MB text faster than 1 MB random through {mbit:g} Mbit/s "
            "links (ratio text/random)",
            _div(get("crew transient", link_workload("text", mbit), "calls/s"),
                 get("crew transient", link_workload("random", mbit), "calls/s")), ">", 1.0))
    judged = []
    for name, value, op, limit in checks:
        holds = None if value is None else (value >= limit if op == ">=" else value > limit
                                            if op == ">" else value <= limit)
        judged.append({"target": name, "value": value, "limit": f"{op} {limit:g}",
                       "holds": holds})
    return judged


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info
                    if line.startswith("model name")), cpu)
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    server = connection._impl.server_properties  # what the broker said at connection.start
    connection.close()
    versions = {}
    for package in ("pika", "msgpack", "tornado", "aio-pika"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "crew commit": _git("rev-parse", "--short", "HEAD"),
            "crew changed since": bool(_git("status", "--porcelain", "--", "crew")),
            "nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(),
            "rabbitmq": _text(server.get("version")), "erlang": _text(server.get("platform")),
            **versions, "http load": http_load.load_generator(),
            "load average": os.getloadavg()}


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=common.ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: a few calls per workload, one round, < 1 minute")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; 1 with --quick)")
    parser.add_argument("--no-rpc", action="store_true",
                        help="skip the RPC workloads (sequential, in flight, 1 MB, deadlines)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP workload")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory workload")
    parser.add_argument("--link", type=float, default=LINK_MBIT, metavar="MBIT",
                        help="the rate of each link of the link workload, Mbit/s each way "
                             f"(default {LINK_MBIT:g})")
    parser.add_argument("--no-link", action="store_true",
                        help="skip the link workload (1 MB calls through rate-limited links)")
    parser.add_argument("--out", type=Path, default=BENCH / "results.json",
                        help="where the figures go (default bench/results.json)")
    parser.add_argument("--experiment", action="append", default=[], metavar="PATCHES",
                        help="add a 'crew transient +PATCHES' row: comma-separated patches "
                             f"of bench/experiments.py ({', '.join(experiments.PATCHES)}); "
                             "repeatable")
    parser.add_argument("--experiment-deadlines", action="store_true",
                        help="run the deadline workload (about 12 s a round) for the "
                             "--experiment rows too")
    parser.add_argument("--systems", metavar="NAMES",
                        help="comma-separated systems to run besides raw (always) and the "
                             "--experiment rows, e.g. 'crew transient,aio-pika'")
    options = parser.parse_args()
    patch_sets = [p.split(",") for p in options.experiment]
    for name in {n for p in patch_sets for n in p} - experiments.PATCHES.keys():
        parser.error(f"unknown patch {name!r}; known: {', '.join(experiments.PATCHES)}")
    sizes = dict(QUICK if options.quick else FULL)
    if options.rounds:
        sizes["rounds"] = options.rounds
    if options.link <= 0:
        parser.error(f"--link must be a rate in Mbit/s above 0, not {options.link:g}")
    sizes["link_mbit"] = None if options.no_link else options.link
    with_aio = importlib.util.find_spec("aio_pika") is not None
    if not with_aio:
        print(f"NOTE: {AIO_PIKA_MISSING}", flush=True)
    names = Names(uuid.uuid4().hex[:8])
    found = systems(names, sizes, with_aio, patch_sets,
                    None if options.systems is None else set(options.systems.split(",")),
                    options.experiment_deadlines)
    info = machine()
    samples: Samples = defaultdict(list)
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("w", prefix="crew-bench-", suffix=".log",
                                     delete=False) as log:
        print(f"crew benchmark, {'quick' if options.quick else 'full'}, {sizes['rounds']} "
              f"round(s); child processes log to {log.name}", flush=True)
        try:
            for number in range(sizes["rounds"]):
                print(f"round {number + 1} of {sizes['rounds']}", flush=True)
                if not options.no_rpc:
                    sequential_round(found, sizes, samples, log)
                    rpc_round(found, samples, log)
                if not options.no_link:
                    link_round(found, sizes, samples, log)
                if not options.no_http:
                    http_round(names, sizes, patch_sets, samples, log)
            if not options.no_memory:
                memory_phase(found, sizes, samples, log)
        finally:
            delete_queues(names.queues())
    info["load average"] = [info["load average"], os.getloadavg()]
    rows = summarize(samples)
    judged = targets(rows, sizes)
    print()
    print(table(rows))
    print("Ratios are to raw in the same run (HTTP: to the inline handler); for ms figures "
          "lower is better. Medians of", sizes["rounds"], "round(s).")
    if not with_aio:
        print(f"NOTE: {AIO_PIKA_MISSING}")
    print("\nTargets (issue 7):")
    for target in judged:
        verdict = {True: "holds", False: "DOES NOT HOLD", None: "not measured"}[target["holds"]]
        value = "-" if target["value"] is None else f"{target['value']:.3g}"
        print(f"  {verdict:13} {target['target']}: {value} (needs {target['limit']})")
    if options.quick:
        print("  (--quick: a smoke test; these figures mean little)")
    options.out.write_text(json.dumps({
        "machine": info, "quick": options.quick, "sizes": sizes,
        "seconds": round(time.monotonic() - started), "rows": rows, "targets": judged,
        "aio-pika": with_aio, "failures": failures}, indent=1) + "\n", encoding="utf-8")
    print(f"\nwritten to {options.out} in {time.monotonic() - started:.0f} s")
    if failures:
        print(f"\n{len(failures)} step(s) FAILED and are missing from the figures "
              f"(child processes' output: {log.name}):")
        for failure in failures:
            print(f"  {failure}")
        return 1
    os.unlink(log.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
