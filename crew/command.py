"""The ``crew`` command (also ``python -m crew``): start workers, make calls, see who serves
what, from a shell.

::

    crew worker myapp.tasks -c 4          serve the tasks a module registers
    crew call test '{"n": 1}' --json      call a task, print its result
    crew status                           task queues and live workers
    crew inspect                          the calls running on each worker
    crew cancel CORRELATION_ID            stop a call, as its caller's cancellation does
    crew purge TASK                       delete the calls waiting for a task
    crew publish CHANNEL DATA / crew subscribe CHANNEL
    crew gateway --port 8080              the HTTP gateway (with the dashboard)
    crew dashboard --port 8090            the dashboard alone: tasks, workers, calls, failures

The top of the stack: it parses argv, and hands ``worker`` to :func:`crew.worker.main`,
``gateway`` to :func:`crew.gateway.main`, ``dashboard`` to :func:`crew.dashboard.main` and
the others to :mod:`crew.calling`. Exit
statuses: :data:`EXIT_CODES` (also in ``crew --help`` and the README).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from typing import Any, Callable, Coroutine, Sequence

from . import calling, census, protocol
from .cli import (EXIT_STUCK, add_broker_arguments, add_logging_arguments,
                  broker_from_options, setup_logging)
from .cli import build_parser as worker_parser
from .exceptions import (ConnectionLostError, CrewError, DeliveryLimitError, ExpirationError,
                         RemoteError, TimeoutError, UnknownTaskError)
from .registry import tasks as default_registry
from .settings import BrokerSettings
from .worker import main as worker_main

__all__ = ["EXIT_CODES", "build_parser", "main"]

#: Every exit status of ``crew``, with its meaning (the README's table says the same).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "any other failure (a broker refusal, a reply that cannot be read, a declined purge)"),
    (2, "bad usage: an unknown option, DATA that is not JSON, a value out of range, or a "
        "purge with neither --yes nor a terminal to confirm on"),
    (EXIT_STUCK, "crew worker: too many stuck job threads; restart it"),
    (4, "remote error: the task raised (its traceback is on standard error)"),
    (5, "timeout: the job ran past its deadline, or no answer came by then"),
    (6, "expired: no worker started the call before its deadline"),
    (calling.EXIT_NOT_FOUND, "unknown task (no queue), or crew cancel: no worker runs the call"),
    (8, "no broker: it cannot be reached, or refused the login"),
    (9, "delivery limit: a quorum queue gave the call up (its worker died every time)"),
    (130, "interrupted (SIGINT)"),
)
#: The exit status of each error, the first match counting.
_STATUS_OF: tuple[tuple[type[BaseException], int], ...] = (
    (RemoteError, 4), (TimeoutError, 5), (ExpirationError, 6),
    (UnknownTaskError, calling.EXIT_NOT_FOUND), (ConnectionLostError, 8),
    (DeliveryLimitError, 9), (calling.NotConfirmed, 2), (CrewError, 1))

_Run = Callable[[BrokerSettings, argparse.Namespace], Coroutine[Any, Any, int]]
_RUNS: dict[str, _Run] = {
    "call": calling.call, "publish": calling.publish, "subscribe": calling.subscribe,
    "status": calling.status, "inspect": calling.inspect, "cancel": calling.cancel,
    "purge": calling.purge}
_PASSWORD = ("The password comes from the URL in $CREW_URL, $CREW_PASSWORD or "
             "$CREW_PASSWORD_FILE; never put it on the command line (every local user can "
             "read that).")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``crew`` command on ``argv`` (default ``sys.argv[1:]``); exits the process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["worker"]:
        sys.exit(worker(args[1:]))
    if args[:1] == ["gateway"]:
        from .gateway import main as gateway_main  # here: Tornado's web stack is not free

        gateway_main(args[1:], prog="crew gateway")
        return
    if args[:1] == ["dashboard"]:
        from .dashboard import main as dashboard_main  # here, as the gateway

        dashboard_main(args[1:], prog="crew dashboard")
        return
    parser = build_parser()
    options = parser.parse_args(args)
    setup_logging(options)
    try:
        broker = broker_from_options(options, f"crew-{options.command}")
    except ValueError as exc:
        parser.error(str(exc))
    sys.exit(_run(_RUNS[options.command], broker, options))


def _run(run: _Run, broker: BrokerSettings, options: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(broker, options))
    except KeyboardInterrupt:
        return 130
    except CrewError as exc:
        _report(exc, options)
        return next(code for kind, code in _STATUS_OF if isinstance(exc, kind))
    except (ValueError, TypeError) as exc:  # DATA, a header, a priority out of range
        print(f"crew {options.command}: {exc}", file=sys.stderr)
        return 2


def _report(exc: CrewError, options: argparse.Namespace) -> None:
    """The error on standard error: a line (a JSON object with --json), and for a
    RemoteError the task's traceback."""
    error: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RemoteError):
        error.update(type=exc.type, message=exc.message, traceback=exc.traceback)
    if getattr(options, "json", False):
        print(calling.to_json(error), file=sys.stderr)
    elif isinstance(exc, RemoteError):
        print(f"{exc.traceback.rstrip()}\ncrew {options.command}: the task raised {exc}"
              if exc.traceback else f"crew {options.command}: the task raised {exc}",
              file=sys.stderr)
    elif isinstance(exc, calling.NotConfirmed):
        print(f"crew {options.command}: {exc}", file=sys.stderr)
    else:
        print(f"crew {options.command}: {type(exc).__name__}: {exc}", file=sys.stderr)


# --- crew worker --------------------------------------------------------------------------

def worker(args: list[str]) -> int:
    """``crew worker MODULE [options]``: import MODULE and serve the tasks it registers."""
    parser = worker_parser("crew worker")
    parser.description = ("Import MODULE (a module path such as myapp.tasks, or a file "
                          "path/to/tasks.py) and serve the tasks it registers until SIGINT "
                          "or SIGTERM: its own registry if it has one named `tasks` (with "
                          "its `settings`), else every @Task it declared. A module that "
                          "calls run() itself is served as `python MODULE.py OPTIONS` would "
                          "serve it.")
    parser.add_argument("module", metavar="MODULE", help="module path or .py file path")
    options = parser.parse_args(args)
    rest = list(args)
    rest.remove(options.module)
    sys.argv = [options.module, *rest]  # what run(), called at import, parses
    try:
        module = calling.load_module(options.module)
    except (ImportError, OSError) as exc:
        parser.error(f"cannot import {options.module}: {exc}")
    tasks, settings = calling.registry_of(module, default_registry)
    if not tasks:
        parser.error(f"{options.module} registers no task (decorate functions with @Task)")
    worker_main(tasks, settings, rest, prog=f"crew worker {options.module}")
    return 0  # not reached: worker_main exits


# --- the parser ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``crew`` parser, with a subparser for each subcommand it parses itself."""
    epilog = "exit statuses:\n" + "\n".join(
        textwrap.fill(text, 88, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
        for code, text in EXIT_CODES)
    parser = argparse.ArgumentParser(
        prog="crew", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start crew workers, call tasks, see who serves what. "
                    "`crew COMMAND --help` tells more.",
        epilog=f"{epilog}\n\n{textwrap.fill(_PASSWORD, 88)}")
    parser.add_argument("--version", action="version", version=f"crew {protocol.VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("worker", add_help=False, help="serve the tasks of a module: "
                        "crew worker MODULE [-c N] [--forks N] [--grace S] ...")
    _call_parsers(commands)
    _census_parsers(commands)
    commands.add_parser("gateway", add_help=False,
                        help="the HTTP gateway to every task and channel (python -m crew.gateway)")
    commands.add_parser("dashboard", add_help=False,
                        help="the dashboard alone: crew dashboard [--port 8090] [--read-only]")
    return parser


def _subcommand(commands: Any, name: str, summary: str,
                description: str) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description, epilog=_PASSWORD)
    add_broker_arguments(sub)
    sub.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                     help="seconds to keep trying to reach the broker (default %(default)g)")
    add_logging_arguments(sub, default="WARNING")
    return sub


def _window(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` of the subcommands that ask the workers."""
    parser.add_argument("--timeout", type=float, default=census.DEFAULT_WINDOW, metavar="S",
                        help="seconds to gather the workers' answers (default %(default)g)")


def _json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def _header(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"a header is NAME=VALUE, not {text!r}")
    return name, value


class _Headers(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        headers = dict(getattr(namespace, self.dest) or {})
        headers[values[0]] = values[1]
        setattr(namespace, self.dest, headers)


def _call_parsers(commands: Any) -> None:
    call = _subcommand(commands, "call", "call a task and print its result",
                       "Call TASK with DATA and print its result; an error goes to standard "
                       "error (a remote one with its traceback) with its exit status.")
    call.add_argument("task", metavar="TASK", help="the task's name")
    call.add_argument("data", metavar="DATA", nargs="?",
                      help="the argument, as JSON; - reads it from standard input "
                           "(default: null)")
    call.add_argument("--priority", type=int, default=0, metavar="N", help="0-255 (default 0)")
    call.add_argument("--expiration", type=float, default=protocol.DEFAULT_EXPIRATION,
                      metavar="S", help="seconds the call may take, queue time included "
                                        "(default %(default)g)")
    call.add_argument("--header", type=_header, action=_Headers, metavar="NAME=VALUE",
                      help="a header the task reads as context.headers (a string); repeat it")
    _json_flag(call, "the result")
    publish = _subcommand(commands, "publish", "publish a message on a pubsub channel",
                          "Send DATA to every client subscribed to CHANNEL now.")
    publish.add_argument("channel", metavar="CHANNEL", help="the channel's name")
    publish.add_argument("data", metavar="DATA",
                         help="the message, as JSON; - publishes each line of standard input")
    subscribe = _subcommand(commands, "subscribe", "print the messages of a pubsub channel",
                            "Print each message of CHANNEL as one line of JSON, until "
                            "--count messages came or SIGINT/SIGTERM (exit status 0). A lost "
                            "connection is made again; what was published meanwhile is "
                            "missed.")
    subscribe.add_argument("channel", metavar="CHANNEL",
                           help="a channel; * matches one word, # any words")
    subscribe.add_argument("--count", type=int, default=0, metavar="N",
                           help="exit after N messages (default 0: never)")


def _census_parsers(commands: Any) -> None:
    status = _subcommand(commands, "status", "task queues and live workers",
                         "The task queues (ready calls, consumers, type, max priority) of "
                         "every task a live worker serves, and of each TASK named; and every "
                         "worker that answers within --timeout. No management plugin needed.")
    status.add_argument("tasks", metavar="TASK", nargs="*", help="also show these tasks")
    _window(status)
    _json_flag(status, "the tasks and workers")
    inspect = _subcommand(commands, "inspect", "the calls each live worker runs",
                          "The calls each worker that answers is serving: task, correlation "
                          "id, caller, state, elapsed time and deadline.")
    _window(inspect)
    _json_flag(inspect, "the calls")
    cancel = _subcommand(commands, "cancel", "stop a call, as its caller's cancellation does",
                         "Send the cancel notice of a call: the worker running it interrupts "
                         "it, and one that receives it later drops it; its caller gets no "
                         "reply. The caller's reply queue is asked of the workers, unless "
                         "--caller gives it.")
    cancel.add_argument("correlation_id", metavar="CORRELATION_ID",
                        help="the call's correlation id (from crew inspect)")
    cancel.add_argument("--caller", metavar="QUEUE",
                        help="the call's reply queue (from crew inspect), to cancel a call "
                             "no worker runs yet")
    _window(cancel)
    purge = _subcommand(commands, "purge", "delete the calls waiting for a task",
                        "Delete every call waiting in TASK's queue, after asking (on the "
                        "terminal) unless --yes. Their callers get no answer: a TimeoutError "
                        "at their deadline. Calls being run are not touched.")
    purge.add_argument("task", metavar="TASK", help="the task whose waiting calls go")
    purge.add_argument("--yes", action="store_true", help="do not ask")
    _json_flag(purge, "how many calls were dropped")
