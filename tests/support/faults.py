"""Fault-test harness: a private RabbitMQ node, a TCP fault proxy, worker processes, a ledger.

Loaded as a pytest plugin by ``tests/nodes/test_faults.py``
(``pytest_plugins = ["tests.support.faults"]``), so its fixtures and its summary hook
exist only when the fault tests are collected.

- :class:`PrivateBroker` (fixture ``private_broker``, one per session): a RabbitMQ node of
  its own (``crewfault@localhost``, AMQP 127.0.0.1:5682, distribution port 25682; started,
  stopped and killed by :class:`brokernode.PrivateNode`) whose home, database, logs and
  config live in a temporary directory. Tests may kill, stop, restart, alarm and cut it; the
  shared broker on 5672 is never touched. Its ``consumer_timeout`` is 15 s (ticked every
  5 s) so that the ack timeout can be tested in seconds. This module adds the session lock,
  the clean-up of a node a killed session left running, and the fault helpers.
- :class:`FaultProxy`: a TCP proxy in a thread of its own, between a client and the node,
  that passes, black-holes (no FIN, no RST), resets (RST) or refuses connections.
- :class:`WorkerProcess` (fixture ``fault_workers``): ``python script.py`` running crew's
  worker against a URL given in ``$CREW_URL``; tasks print a line when a run starts and ends,
  which :class:`RunLog` counts, so a call that runs twice cannot go unnoticed.
- :class:`Ledger` (fixture ``ledger``): every call a scenario makes, the faults it injects and
  how each call ended; :func:`pytest_terminal_summary` prints the table of every scenario.

Not for production use: the node runs with test-only settings, and waiting for the node to
boot or a queue to drain polls ``rabbitmqctl``, which has no way to notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from crew import Client, CrewError
from tests.support.brokernode import (
    NodeStartError,
    PrivateNode,
    pids_with_environ_containing,
    rabbitmq_sbin,
)

ROOT = Path(__file__).resolve().parents[2]  # the checkout

#: The node's AMQP port; ``$CREW_FAULT_PORT`` moves it (and the node's name and
#: distribution port with it), for a second checkout on the same machine.
AMQP_PORT = int(os.environ.get("CREW_FAULT_PORT") or 5682)
DIST_PORT = AMQP_PORT + 20000
NODE = "crewfault@localhost" if AMQP_PORT == 5682 else f"crewfault{AMQP_PORT}@localhost"
#: The node's ack timeout (ms) and how often channels check it (ms).
CONSUMER_TIMEOUT_MS = 15000
CHANNEL_TICK_MS = 5000


# --- the private node ----------------------------------------------------------------------


class PrivateBroker(PrivateNode):
    """The fault tests' node (:class:`brokernode.PrivateNode`), in ``base`` (a temporary
    directory): its ack timeout is short, and it can be alarmed and its connections closed."""

    def __init__(self, base: Path, sbin: Path) -> None:
        super().__init__(
            base, sbin, NODE, AMQP_PORT, DIST_PORT,
            conf=[f"consumer_timeout = {CONSUMER_TIMEOUT_MS}"],
            advanced=f"[{{rabbit, [{{channel_tick_interval, {CHANNEL_TICK_MS}}}]}}].\n")

    def queues(self) -> list[tuple[str, int, int, int]]:
        """Every queue as ``(name, messages_ready, messages_unacknowledged, consumers)``,
        streams aside: a stream keeps what it holds by design (crew.cancels, the notices)."""
        rows = json.loads(self.ctl("list_queues", "--formatter", "json", "name", "type",
                                   "messages_ready", "messages_unacknowledged", "consumers")
                          or "[]")
        # A stream that is down lists as rabbit_stream_queue, with no counts.
        return [(r["name"], int(r["messages_ready"]), int(r["messages_unacknowledged"]),
                 int(r["consumers"])) for r in rows
                if r["type"] not in ("stream", "rabbit_stream_queue")]

    def connections(self) -> list[tuple[str, str]]:
        """Every client connection as ``(pid, connection_name)``.

        The plain (tab-separated) listing, not JSON: only its pid spelling
        (``<node.N.N.N>``) is accepted back by ``close_connection``.
        """
        found = []
        for line in self.ctl("list_connections", "--no-table-headers", "pid",
                             "client_properties").splitlines():
            pid, _, properties = line.partition("\t")
            name = _CONNECTION_NAME.search(properties)
            if pid.startswith("<"):
                found.append((pid, name[1] if name else ""))
        return found

    def close_connections(self, name_substring: str) -> int:
        """Close every connection whose name contains ``name_substring``; how many."""
        closed = 0
        for pid, name in self.connections():
            if name_substring in name:
                self.ctl("close_connection", pid, "crew fault test")
                closed += 1
        return closed

    def alarm_on(self) -> None:
        """Raise the memory alarm: every publishing connection is blocked."""
        self.ctl("set_vm_memory_high_watermark", "0.0000001")

    def alarm_off(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.4")

    def wait_drained(self, names: Callable[[str], bool], timeout: float = 30.0
                     ) -> list[tuple[str, int, int, int]]:
        """Wait (bounded) until the matching queues hold no message; return their rows.

        rabbitmqctl cannot notify, so this asks again each second until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            rows = [q for q in self.queues() if names(q[0])]
            if all(ready == 0 and unacked == 0 for _, ready, unacked, _ in rows):
                return rows
            if time.monotonic() >= deadline:
                return rows
            time.sleep(1.0)



_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateBroker]:
    """The private node, started once for the session; stopped and deleted after it.

    A test that stops or kills it must start it again before it ends; the fixture
    ``broker`` (function scope) checks that and restarts it if a test failed midway.
    """
    sbin = rabbitmq_sbin(os.environ.get("CREW_FAULT_RABBITMQ_SBIN"))
    if sbin is None:
        pytest.skip("fault tests need rabbitmq-server installed (a private node is started "
                    f"on 127.0.0.1:{AMQP_PORT}); set CREW_FAULT_RABBITMQ_SBIN to its sbin folder")
    lock = _take_node_lock()
    if lock is None:
        pytest.skip(f"another test session runs the private node ({NODE}, port {AMQP_PORT}): "
                    "fault tests skipped in this one")
    busy = [port for port in (AMQP_PORT, DIST_PORT) if _port_in_use(port)]
    if busy and _reap_stale_nodes():
        busy = [port for port in (AMQP_PORT, DIST_PORT) if _port_in_use(port)]
    if busy:
        lock.close()
        pytest.fail(f"port(s) {busy} on 127.0.0.1 are in use, so the private node cannot start; "
                    "a node left over from an interrupted run? (rabbitmqctl -n "
                    f"{NODE} cannot reach it without its cookie: find it with `ss -ltnp`)",
                    pytrace=False)
    base = Path(tempfile.mkdtemp(prefix="crewfault-"))
    node = PrivateBroker(base, sbin)
    try:
        try:
            node.start()
        except NodeStartError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield node
    finally:
        node.stop()
        if os.environ.get("CREW_FAULT_KEEP"):
            print(f"\nprivate node files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
        lock.close()


def _take_node_lock() -> Any:
    """An exclusive lock on the node's ports for this session, or None if another holds it."""
    path = Path(tempfile.gettempdir()) / f"crewfault-{AMQP_PORT}.lock"
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _reap_stale_nodes() -> int:
    """Kill the node of a session that died without its teardown (killed by a timeout, say).

    Called only while holding the lock, so no live session owns such a node. A process
    belongs to it only if its environment names this node and a ``crewfault-`` home; each
    such process is killed by its pid (never by group or name) and the home deleted.
    Returns how many processes were killed."""
    homes, killed = set(), 0
    for pid in pids_with_environ_containing(f"RABBITMQ_NODENAME={NODE}\0".encode()):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
            home = Path(env.get(b"RABBITMQ_MNESIA_BASE", b"").decode()).parent
            if not home.name.startswith("crewfault-"):
                continue
            os.kill(pid, signal.SIGKILL)
            homes.add(home)
            killed += 1
    for home in homes:
        print(f"\nkilled the private node an earlier session left running ({home})")
        shutil.rmtree(home, ignore_errors=True)
    if killed:
        time.sleep(1.0)  # the kernel frees the ports as the processes go; a moment
    return killed


def _port_in_use(port: int) -> bool:
    with socket.socket() as probe:
        # SO_REUSEADDR, as the node's own listener: only a listening socket makes bind fail,
        # not the TIME_WAIT leftovers of the previous session's connections.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.fixture
def broker(private_broker: PrivateBroker) -> Iterator[PrivateBroker]:
    """The private node, running and without an alarm, for one test."""
    if not private_broker.running:
        private_broker.start()
    yield private_broker
    if not private_broker.running:
        private_broker.start()
    with contextlib.suppress(Exception):
        private_broker.alarm_off()


# --- the fault proxy -----------------------------------------------------------------------

PASS, BLACKHOLE, RESET, REFUSE = "pass", "blackhole", "reset", "refuse"


class FaultProxy:
    """A TCP proxy from 127.0.0.1:<free port> to ``upstream``, with switchable faults.

    - ``pass``: bytes flow both ways.
    - ``blackhole``: connections stay open and nothing flows, in either direction, on old
      or new ones (new ones are accepted and held; no FIN, no RST), like a silent network
      drop. Back in ``pass`` they flow again.
    - ``reset``: every open connection is closed with an RST (SO_LINGER 0) and so is every
      new one while the mode lasts.
    - ``refuse``: nothing listens (connecting fails with ECONNREFUSED); open connections
      are left alone.

    :meth:`cut_at` sets a one-shot trap instead: the next connection whose client sends a
    given AMQP method (say ``queue.declare``) is reset right there, before the method
    reaches the broker, to break a client in the middle of its setup.

    It runs an asyncio loop in a daemon thread; :meth:`set_mode` and :meth:`close` are
    called from any other thread and return once the change is in effect.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = PASS
        self.accepted = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._links: set[_Link] = set()
        self._trap: tuple[int, int] | None = None
        #: Set (thread-safely) when the trap of :meth:`cut_at` went off.
        self.trap_sprung = threading.Event()
        self._thread.start()
        self.port = self._run(self._start())

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def url(self, query: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{'?' + query if query else ''}"

    def set_mode(self, mode: str) -> None:
        if mode not in (PASS, BLACKHOLE, RESET, REFUSE):
            raise ValueError(f"mode must be pass, blackhole, reset or refuse, got {mode!r}")
        self._run(self._set_mode(mode))

    def cut_at(self, class_id: int, method_id: int) -> None:
        """Reset the next connection whose client sends this AMQP method (one shot); e.g.
        ``cut_at(50, 10)`` for queue.declare."""
        self.trap_sprung.clear()
        self._loop.call_soon_threadsafe(setattr, self, "_trap", (class_id, method_id))

    def close(self) -> None:
        """Stop listening, reset every connection, stop the thread."""
        if not self._thread.is_alive():
            return
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self, port: int = 0) -> int:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port,
                                                  reuse_address=True)
        return self._server.sockets[0].getsockname()[1]

    async def _set_mode(self, mode: str) -> None:
        assert self._flowing is not None
        if mode == REFUSE:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
        elif self._server is None:
            await self._start(self.port)
        if mode == RESET:
            for link in list(self._links):
                link.reset()
        if mode == BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        self.mode = mode

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.reset()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.mode == RESET:
                link.reset()
                return
            await self._flowing.wait()  # a held connection: accepted, nothing forwarded
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                link.reset()
                return
            link.upstream = up_writer
            await asyncio.gather(self._pump(reader, up_writer, link, _FrameWatch()),
                                 self._pump(up_reader, writer, link))
        except asyncio.CancelledError:
            pass  # close(): the proxy stops; asyncio's server must not log it as an error
        finally:
            self._links.discard(link)
            link.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    link: "_Link", watch: "_FrameWatch | None" = None) -> None:
        """Copy one direction; ``watch`` (client to broker only) springs the trap."""
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # read just before a black-hole: hold it
                methods = watch.feed(data) if watch is not None else ()
                if self._trap is not None and self._trap in methods:
                    self._trap = None
                    link.reset()
                    self.trap_sprung.set()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        link.close()


class _FrameWatch:
    """The AMQP methods in a client's byte stream: an 8-byte protocol header, then frames
    of type (1 byte), channel (2), size (4), payload, 0xCE; a method frame's payload starts
    with its class and method ids (2 bytes each)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._header = 8

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        """The (class id, method id) of each method frame completed by ``data``."""
        self._buffer += data
        if self._header:
            skip = min(self._header, len(self._buffer))
            self._buffer, self._header = self._buffer[skip:], self._header - skip
        methods = []
        while len(self._buffer) >= 7:
            kind, _channel, size = struct.unpack(">BHI", self._buffer[:7])
            if len(self._buffer) < 8 + size:
                break
            if kind == 1 and size >= 4:
                methods.append(struct.unpack(">HH", self._buffer[7:11]))
            self._buffer = self._buffer[8 + size:]
        return methods


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, downstream: asyncio.StreamWriter) -> None:
        self.downstream = downstream
        self.upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        for writer in (self.downstream, self.upstream):
            if writer is None or writer.transport.is_closing():
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            writer.transport.abort()

    def close(self) -> None:
        for writer in (self.downstream, self.upstream):
            if writer is not None and not writer.transport.is_closing():
                writer.close()


@pytest.fixture
def fault_proxy(broker: PrivateBroker) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the private node, in ``pass`` mode."""
    proxy = FaultProxy(("127.0.0.1", broker.port))
    try:
        yield proxy
    finally:
        proxy.close()


# --- worker processes and their runs ---------------------------------------------------------

WORKER_SCRIPT = textwrap.dedent('''
    """A crew worker for fault tests: each run of a call prints when it starts and ends."""
    import os, time
    from crew.worker import run, Task

    PREFIX = os.environ["FAULT_PREFIX"]
    runs = {}


    def mark(event, call_id):
        # One write(2) of a short line: concurrent jobs' lines cannot interleave.
        os.write(1, f"FAULT-RUN {event} {call_id} {os.getpid()}\\n".encode())


    @Task(PREFIX + ".job")
    def job(req):
        """{"id", "sleep": seconds, "first_only": only the first run in this process sleeps}"""
        call_id = req["id"]
        runs[call_id] = n = runs.get(call_id, 0) + 1
        mark("start", call_id)
        seconds = req.get("sleep", 0)
        if req.get("first_only") and n > 1:
            seconds = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:   # work in slices, so an interruption lands
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        mark("end", call_id)
        return {"id": call_id, "pid": os.getpid(), "run": n}


    @Task(PREFIX + ".echo")
    def echo(req):
        mark("start", req["id"])
        mark("end", req["id"])
        return {"id": req["id"], "pid": os.getpid()}


    run()
''')

_RUN_LINE = re.compile(r"^FAULT-RUN (start|end) (\S+) (\d+)$")


class RunLog:
    """Every run of every call, as printed by the workers of one test (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[tuple[str, str, int]] = []  # (event, call id, pid)

    def add(self, event: str, call_id: str, pid: int) -> None:
        with self._cond:
            self.events.append((event, call_id, pid))
            self._cond.notify_all()

    def starts(self, call_id: str) -> list[int]:
        with self._cond:
            return [pid for e, c, pid in self.events if e == "start" and c == call_id]

    def ends(self, call_id: str) -> list[int]:
        with self._cond:
            return [pid for e, c, pid in self.events if e == "end" and c == call_id]

    def wait(self, predicate: Callable[["RunLog"], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_started(self, call_id: str, timeout: float = 30.0, count: int = 1) -> list[int]:
        if not self.wait(lambda log: len(log.starts(call_id)) >= count, timeout):
            raise AssertionError(f"call {call_id} did not start {count} time(s) "
                                 f"within {timeout} s")
        return self.starts(call_id)


class WorkerProcess:
    """``python worker.py ARGS`` with its output read in a thread (lines kept, runs logged)."""

    def __init__(self, script: Path, url: str, prefix: str, runs: RunLog, args: list[str],
                 name: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["CREW_URL"] = url  # the password travels in the environment, never in argv
        env["FAULT_PREFIX"] = prefix
        self.name = name
        self.runs = runs
        self.popen = subprocess.Popen([sys.executable, str(script), *args], env=env,
                                      cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid
        self.output: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            match = _RUN_LINE.match(line.strip())
            if match:
                self.runs.add(match[1], match[2], int(match[3]))
            with self._cond:
                self.output.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
        """The first line from number ``after`` on that matches ``pattern``; raise if none
        comes within ``timeout`` or the process ends."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = after
        with self._cond:
            while True:
                for line in self.output[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.output)
                ended = not self._reader.is_alive()
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    raise AssertionError(
                        f"worker {self.name} printed no line matching {pattern!r} within "
                        f"{timeout} s{' (it exited)' if ended else ''}; output:\n"
                        f"{self.text()[-4000:]}")
                self._cond.wait(left)

    def count(self, pattern: str) -> int:
        """How many lines printed so far match ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.output if regex.search(line))

    def lines(self) -> int:
        with self._cond:
            return len(self.output)

    def text(self) -> str:
        with self._cond:
            return "".join(self.output)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM (graceful) and wait for the exit status."""
        self.signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


class Workers:
    """Worker processes of one test, all serving the test's tasks."""

    def __init__(self, script: Path, prefix: str) -> None:
        self.script = script
        self.prefix = prefix
        self.runs = RunLog()
        self.started: list[WorkerProcess] = []

    def start(self, url: str, *args: str) -> WorkerProcess:
        worker = WorkerProcess(self.script, url, self.prefix, self.runs, list(args),
                               f"w{len(self.started) + 1}")
        self.started.append(worker)
        return worker

    def output(self, limit: int | None = 6000) -> str:
        """Every worker's output (its last ``limit`` characters each)."""
        return "\n".join(f"===== worker {w.name} (pid {w.pid}, exit {w.popen.poll()})\n"
                         f"{w.text()[-limit if limit else 0:]}" for w in self.started)

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()


@pytest.fixture
def fault_prefix(request: pytest.FixtureRequest) -> str:
    """Task-name prefix unique to this test: its tasks are ``<prefix>.job``, ``.echo``."""
    return f"f{uuid.uuid4().hex[:8]}.{request.node.name[5:35]}"


@pytest.fixture
def fault_workers(broker: PrivateBroker, tmp_path: Path, fault_prefix: str,
                  request: pytest.FixtureRequest) -> Iterator[Workers]:
    """Start worker processes with :meth:`Workers.start`. After the test they are killed,
    their output is printed if it failed, and the test's task queues are deleted (so that
    what a failed test left behind cannot fail the next one)."""
    script = tmp_path / "fault_worker.py"
    script.write_text(WORKER_SCRIPT)
    workers = Workers(script, fault_prefix)
    yield workers
    workers.kill_all()
    report = getattr(request.node, "rep_call", None)
    if os.environ.get("CREW_FAULT_VERBOSE"):
        print(workers.output(limit=None))
    elif report is not None and report.failed:
        print(workers.output())
    if broker.running:
        for name, *_ in broker.queues():
            if fault_prefix in name:
                broker.ctl("delete_queue", name)


@pytest.fixture
def fault_clients(io_loop: Any) -> Iterator[Callable[..., Client]]:
    """``make(url, **kwargs)``: clients (not connected yet), closed after the test."""
    made: list[Client] = []

    def make(url: str, **kwargs: Any) -> Client:
        client = Client(url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            io_loop.run_sync(client.close, timeout=15)


# --- the ledger: calls, faults, answers ------------------------------------------------------

#: Every scenario's figures, in the order they ran; printed at the end of the session.
FIGURES: dict[str, dict[str, Any]] = {}


@dataclasses.dataclass
class CallRecord:
    call_id: str
    task: str
    expiration: float
    retry: bool
    started: float = dataclasses.field(default_factory=time.monotonic)
    ended: float | None = None
    outcome: Any = None  # the result, or the exception
    answers: int = 0

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def kind(self) -> str:
        if self.answers == 0:
            return "none"
        if isinstance(self.outcome, BaseException):
            return type(self.outcome).__name__
        return "result"


class Ledger:
    """The calls one scenario makes and how each ended."""

    #: An answer may come this long past a call's deadline before the call counts as hung
    #: (the client's own grace is 1 s; the rest absorbs a slow, busy machine).
    HANG_SLACK = 10.0

    def __init__(self, scenario: str, runs: RunLog | None = None) -> None:
        self.scenario = scenario
        self.runs = runs
        self.calls: dict[str, CallRecord] = {}
        self.faults: list[str] = []
        self.notes: list[str] = []
        self._numbers = itertools.count(1)
        self._t0 = time.monotonic()

    def fault(self, what: str) -> None:
        self.faults.append(f"{time.monotonic() - self._t0:.1f}s {what}")

    def note(self, what: str) -> None:
        self.notes.append(what)

    def new_id(self, label: str = "c") -> str:
        return f"{label}{next(self._numbers)}-{uuid.uuid4().hex[:6]}"

    async def call(self, client: Client, task: str, data: dict[str, Any] | None = None, *,
                   call_id: str | None = None, expiration: float = 30.0,
                   retry: bool | None = None, **kwargs: Any) -> Any:
        """Make one call; return its result or the crew error it ended with (never raise
        it). A call that gives no answer by its deadline plus :attr:`HANG_SLACK` is
        recorded as hung and raises AssertionError."""
        call_id = call_id or self.new_id()
        record = CallRecord(call_id, task, expiration, bool(retry))
        self.calls[call_id] = record
        payload = {"id": call_id, **(data or {})}
        if retry is not None:
            kwargs["retry"] = retry
        try:
            record.outcome = await asyncio.wait_for(
                client.call(task, payload, expiration=expiration, **kwargs),
                expiration + self.HANG_SLACK)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, CrewError):  # crew's TimeoutError subclasses the builtin
                record.outcome = exc
            else:
                record.ended = time.monotonic()
                raise AssertionError(
                    f"call {call_id} to {task} hung: no answer "
                    f"{expiration + self.HANG_SLACK:.0f} s after it was made") from None
        except CrewError as exc:
            record.outcome = exc
        record.ended = time.monotonic()
        record.answers += 1
        return record.outcome

    def start(self, client: Client, task: str, data: dict[str, Any] | None = None,
              **kwargs: Any) -> "asyncio.Task[Any]":
        """:meth:`call` as a task started now; the call id is ``task.call_id``."""
        call_id = kwargs.pop("call_id", None) or self.new_id()
        started = asyncio.ensure_future(self.call(client, task, data, call_id=call_id,
                                                  **kwargs))
        started.call_id = call_id  # type: ignore[attr-defined]
        return started

    def kinds(self, ids: list[str] | None = None) -> Counter[str]:
        return Counter(r.kind for cid, r in self.calls.items() if ids is None or cid in ids)

    def record(self, runs: RunLog | None = None, leftovers: int | None = 0) -> dict[str, Any]:
        """Store this scenario's figures for the summary and return them (``leftovers``
        None: not checked)."""
        runs = runs or self.runs
        kinds = self.kinds()
        runs_per_call = ({cid: len(runs.starts(cid)) for cid in self.calls} if runs else {})
        completed = ({cid: len(runs.ends(cid)) for cid in self.calls} if runs else {})
        for cid, n in runs_per_call.items():
            if n > 1 or completed.get(cid, 0) > 1:
                call = self.calls[cid]
                self.note(f"call {cid} ({call.kind}{', retry' if call.retry else ''}) started "
                          f"{n} times, ran to the end {completed[cid]} times")
        figures = {
            "calls": len(self.calls),
            "faults": list(self.faults),
            "results": kinds.get("result", 0),
            "errors": {k: v for k, v in kinds.items() if k not in ("result", "none")},
            "lost": sum(1 for r in self.calls.values() if r.answers != 1),
            "runs": sum(runs_per_call.values()),
            "reruns": sum(max(0, n - 1) for n in runs_per_call.values()),
            "completed twice": sum(1 for n in completed.values() if n > 1),
            "slowest answer": max((r.seconds for r in self.calls.values()), default=0.0),
            "left in queues": leftovers,
            "notes": list(self.notes),
            "status": "?",
        }
        FIGURES[self.scenario] = figures
        return figures


@pytest.fixture
def ledger(request: pytest.FixtureRequest, fault_workers: Workers) -> Iterator[Ledger]:
    """The scenario's ledger; its figures are recorded even when the scenario fails."""
    ledger = Ledger(request.node.name, fault_workers.runs)
    yield ledger
    if ledger.scenario not in FIGURES:
        ledger.record(leftovers=None)
    report = getattr(request.node, "rep_call", None)
    FIGURES[ledger.scenario]["status"] = "passed" if report and report.passed else "FAILED"


# --- pytest hooks (this module is a plugin) ----------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell that the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if report.when == "call" and item.name in FIGURES:
        # Scenarios that keep their own Ledger (the cluster's) recorded during the call.
        FIGURES[item.name]["status"] = "passed" if report.passed else "FAILED"
    return report


def summary_table() -> str:
    """The figures of every scenario that ran, as a Markdown table."""
    head = ("| scenario | status | calls | faults | results | errors | lost | runs | reruns "
            "| completed twice | slowest answer (s) | left in queues |")
    lines = [head, "|" + "---|" * 12]
    for name, f in FIGURES.items():
        errors = ", ".join(f"{k} {v}" for k, v in sorted(f["errors"].items())) or "-"
        left = "?" if f["left in queues"] is None else f["left in queues"]
        lines.append(f"| {name.removeprefix('test_')} | {f['status']} | {f['calls']} "
                     f"| {len(f['faults'])} | {f['results']} | {errors} | {f['lost']} "
                     f"| {f['runs']} | {f['reruns']} | {f['completed twice']} "
                     f"| {f['slowest answer']:.1f} | {left} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("crew fault scenarios")
    terminalreporter.write_line(summary_table())
    for name, f in FIGURES.items():
        terminalreporter.write_line(f"{name}: faults: {'; '.join(f['faults']) or '-'}")
        for note in f["notes"]:
            terminalreporter.write_line(f"    {note}")


__all__ = ["BLACKHOLE", "FIGURES", "FaultProxy", "Ledger", "PASS", "PrivateBroker", "REFUSE",
           "RESET", "RunLog", "WorkerProcess", "Workers"]
