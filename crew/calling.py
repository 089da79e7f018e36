"""What the ``crew`` command does once its arguments are read: one coroutine per subcommand
that talks to the broker (``worker`` and ``gateway`` are :mod:`crew.worker`'s and
:mod:`crew.gateway`'s; :func:`load_module` finds what ``crew worker`` serves). Each prints
its data on standard output, JSON with ``--json``, and returns the exit status or raises
the :class:`~crew.CrewError` that :mod:`crew.command` turns into one. Calls, publishing and
subscribing go through the :class:`~crew.Client`; status, inspect, cancel and purge through
one connection of :mod:`crew.census`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import importlib.util
import json
import os
import signal
import sys
from types import ModuleType
from typing import Any, Mapping, TextIO

from . import census
from .cancels import cancel_call
from .client import Client
from .exceptions import CrewError, UnknownTaskError
from .settings import BrokerSettings

__all__ = ["EXIT_NOT_FOUND", "NotConfirmed", "call", "cancel", "inspect", "publish", "purge",
           "load_module", "read_data", "registry_of", "status", "subscribe", "to_json"]

#: Exit status of ``crew cancel`` when no worker runs the call (also UnknownTaskError's).
EXIT_NOT_FOUND = 7


def read_data(text: str | None, stdin: TextIO) -> Any:
    """A command line's JSON argument (``-``: standard input; absent: null), or ValueError."""
    if text is None:
        return None
    source = stdin.read() if text == "-" else text
    try:
        return json.loads(source)
    except ValueError as exc:
        raise ValueError(f"DATA is not JSON ({exc}): {source[:80]!r}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):  # msgpack bytes: base64 text in JSON
        return base64.b64encode(value).decode("ascii")
    return str(value)  # msgpack.Timestamp and the like


def to_json(value: Any) -> str:
    """One line of JSON; bytes become base64 text, other non-JSON values their str()."""
    return json.dumps(value, default=_jsonable, ensure_ascii=False)


def _readable(value: Any) -> str:
    if isinstance(value, str):
        return value.removesuffix("\n")
    return json.dumps(value, default=_jsonable, ensure_ascii=False, indent=2)


def _client(broker: BrokerSettings, reconnect: bool = False) -> Client:
    """A client that fails at once when its connection is lost (a call cannot outlive its
    process anyway), unless it must ``reconnect`` (a subscriber runs for long). Without
    metrics or traces: a command's process ends before anyone could scrape or export them,
    and loading their libraries costs each command about 60 ms."""
    return Client(broker=broker, reconnect=reconnect, metrics=False, traces=False)


async def call(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew call TASK [DATA]``: print the result."""
    data = read_data(options.data, sys.stdin)
    client = _client(broker)
    try:
        await client.connect(options.connect_timeout)
        result = await client.call(options.task, data, priority=options.priority,
                                   expiration=options.expiration, headers=options.header)
    finally:
        await client.close()
    print(to_json(result) if options.json else _readable(result), flush=True)
    return 0


async def publish(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew publish CHANNEL DATA``: DATA ``-`` publishes each line of standard input."""
    if options.data == "-":
        messages = [read_data(line, sys.stdin) for line in sys.stdin if line.strip()]
    else:
        messages = [read_data(options.data, sys.stdin)]
    client = _client(broker)
    try:
        await client.connect(options.connect_timeout)
        for message in messages:
            await client.publish(options.channel, message)
    finally:
        await client.close()
    return 0


async def subscribe(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew subscribe CHANNEL``: one JSON line per message, until ``--count`` messages
    came, or SIGINT or SIGTERM (status 0 either way). A lost connection is made again
    (messages published meanwhile are missed)."""
    done = asyncio.Event()
    seen = 0

    def on_message(data: Any) -> None:
        nonlocal seen
        if done.is_set():
            return
        print(to_json(data), flush=True)
        seen += 1
        if options.count and seen >= options.count:
            done.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    client = _client(broker, reconnect=True)  # subscribed again on the next connection
    try:
        await client.connect(options.connect_timeout)
        await client.subscribe(options.channel, on_message)
        print(f"crew subscribe: listening on {options.channel}", file=sys.stderr, flush=True)
        await done.wait()
    finally:
        await client.close()
    return 0


async def status(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew status [TASK ...]``: the tasks' queues and the live workers."""
    connection = await census.connect(broker, options.connect_timeout)
    try:
        report = await census.status(connection, options.timeout, options.tasks)
    finally:
        await connection.close()
    print(to_json(report) if options.json else census.status_tables(report), flush=True)
    return 0


async def inspect(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew inspect``: the calls each live worker is serving."""
    connection = await census.connect(broker, options.connect_timeout)
    try:
        workers = await census.gather(connection, options.timeout)
    finally:
        await connection.close()
    if options.json:
        print(to_json([{"worker": w.get("worker"), "host": w.get("host"), "pid": w.get("pid"),
                        "calls": w.get("calls") or []} for w in workers]), flush=True)
    else:
        print(census.inspect_table(workers), flush=True)
    return 0


async def cancel(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew cancel CORRELATION_ID``: send the caller's cancel notice (docs/PROTOCOL.md,
    section 7) for a call a worker reports running, or for ``--caller``'s call."""
    connection = await census.connect(broker, options.connect_timeout)
    try:
        caller, deadline, where = options.caller, None, ""
        if caller is None:
            found = census.find_call(await census.gather(connection, options.timeout),
                                     options.correlation_id)
            if found is None:
                print(f"crew cancel: no worker answered that it runs call "
                      f"{options.correlation_id}; give --caller (the call's reply queue) to "
                      "cancel a call that waits in its queue", file=sys.stderr)
                return EXIT_NOT_FOUND
            worker, running = found
            caller, deadline = str(running.get("caller")), running.get("deadline")
            where = f" (task {running.get('task')}, worker {worker.get('worker')})"
        await cancel_call(connection, options.correlation_id, caller,
                          deadline if isinstance(deadline, int) else None)
    finally:
        await connection.close()
    print(f"cancelled call {options.correlation_id}{where}", flush=True)
    return 0


async def purge(broker: BrokerSettings, options: argparse.Namespace) -> int:
    """``crew purge TASK``: delete the calls waiting in the task's queue, once confirmed."""
    connection = await census.connect(broker, options.connect_timeout)
    try:
        figures = (await census.queue_figures(connection, [options.task]))[options.task]
        if figures is None:
            raise UnknownTaskError(options.task)
        if not options.yes and not await _confirmed(options.task, figures[0]):
            return 1
        dropped = await census.purge(connection, options.task)
    finally:
        await connection.close()
    print(to_json({"task": options.task, "dropped": dropped}) if options.json else
          f"{dropped} call(s) dropped from the queue of {options.task}", flush=True)
    return 0


async def _confirmed(task: str, waiting: int) -> bool:
    """Ask on the terminal; without one, refuse (raise) rather than guess."""
    if not sys.stdin.isatty():
        raise NotConfirmed(f"{waiting} call(s) wait for {task}; nothing was purged: there is "
                           "no terminal to ask on, so confirm with --yes")
    question = (f"Delete the {waiting} call(s) waiting for {task}? Their callers get no "
                "answer (TimeoutError at their deadline). [y/N] ")
    answer = await asyncio.get_running_loop().run_in_executor(None, input, question)
    if answer.strip().lower() in ("y", "yes"):
        return True
    print("nothing was purged", file=sys.stderr)
    return False


def load_module(name: str) -> ModuleType:
    """Import a module path (from the current directory too, as ``python -m`` does) or a
    ``.py`` file (its directory first on ``sys.path``, as ``python FILE`` does)."""
    if not (name.endswith(".py") or os.sep in name):
        sys.path.insert(0, os.getcwd())
        return importlib.import_module(name)
    path = os.path.abspath(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
    sys.path.insert(0, os.path.dirname(path))
    module_name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def registry_of(module: ModuleType, default: Mapping[str, Any]
                ) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The tasks to serve and their settings: the module's own ``tasks`` registry and
    ``settings`` if it has them, else ``default`` (what ``@Task`` registered) and none."""
    own, settings = getattr(module, "tasks", None), getattr(module, "settings", None)
    tasks = own if isinstance(own, Mapping) and own else default
    return tasks, settings if isinstance(settings, Mapping) else {}


class NotConfirmed(CrewError):
    """Told to do what it must ask about first (a purge), with no terminal to ask on."""
