"""Command-line pieces: argv parsers, logging and signal handling for the worker's command line
(``python worker.py -H host``, run by :mod:`crew.worker`) and the HTTP servers'
(``python -m crew.gateway``, ``python -m master_example``). With the entry points that use
it, the only place that parses argv or configures logging. It knows no worker or client:
the entry points above it build those."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from . import protocol
from .settings import (DEFAULT_GRACE, DEFAULT_MAX_MEMORY, DEFAULT_MAX_STUCK, MIN_MAX_MEMORY,
                       BrokerSettings)

log = logging.getLogger("crew")

#: Exit status of a worker that drained and exited because too many job threads were stuck;
#: a supervisor (``--forks``, systemd) should start a fresh process.
EXIT_STUCK = 3
_MiB = 1024 * 1024


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve crew tasks from RabbitMQ until SIGINT or SIGTERM.",
        epilog="The password comes from the URL, $CREW_PASSWORD or $CREW_PASSWORD_FILE; "
               "never pass it on the command line (every local user can read that).")
    add_broker_arguments(parser)
    parser.add_argument("-c", "--concurrency", type=int, default=1,
                        help="jobs run at once in each process; it holds no more calls "
                             "than that across its tasks (classic queues) (default 1)")
    parser.add_argument("--forks", type=int, default=0,
                        help="run N worker processes under a supervisor that restarts a dead "
                             "one (default 0: this process is the worker)")
    parser.add_argument("--max-priority", type=int, default=protocol.DEFAULT_QUEUE_MAX_PRIORITY,
                        help="x-max-priority of classic task queues; higher call priorities "
                             "count as this (default %(default)s)")
    parser.add_argument("--queue-type", choices=protocol.QUEUE_TYPES, default=None,
                        help="task queue type: quorum queues are replicated over a cluster "
                             "(default $CREW_QUEUE_TYPE, else classic)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                        help="seconds running jobs get to finish on SIGTERM (default %(default)g)")
    parser.add_argument("--max-stuck", type=int, default=DEFAULT_MAX_STUCK,
                        help="stuck job threads tolerated before the process drains and exits "
                             f"with status {EXIT_STUCK} for a restart (default %(default)s)")
    parser.add_argument("--max-memory", type=int, default=DEFAULT_MAX_MEMORY // _MiB,
                        metavar="MiB",
                        help="memory ceiling for the calls being served, undecoded, inflated "
                             "and decoded; calls beyond it wait (default %(default)s MiB, at "
                             f"least {MIN_MAX_MEMORY // _MiB})")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="N",
                        help="serve Prometheus metrics on http://0.0.0.0:N/metrics (needs "
                             "crew[metrics]); with --forks K, process i serves port N+i")
    add_logging_arguments(parser)
    return parser


def add_broker_arguments(parser: argparse.ArgumentParser, *,
                         port_flags: Sequence[str] = ("-P", "--port")) -> None:
    """Broker options shared by the worker, the examples and the gateway.

    HTTP servers pass ``port_flags=("--broker-port",)``: their ``--port`` is the HTTP port.
    """
    parser.add_argument("--url", default=None,
                        help="amqp:// or amqps:// URL; several, separated by commas, are the "
                             "nodes of one cluster, tried in turn, which must agree on all "
                             "but host and port (default $CREW_URL, else "
                             "amqp://guest:guest@localhost:5672/)")
    parser.add_argument("-H", "--host", default=None,
                        help="broker host (overrides the URL's; refused with several URLs)")
    parser.add_argument(*port_flags, dest="broker_port", type=int, default=None,
                        metavar="PORT", help="broker port (refused with several URLs)")
    parser.add_argument("--vhost", default=None, help="virtual host (of every node)")
    parser.add_argument("--user", default=None, help="user name (on every node)")


def add_logging_arguments(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--logging", default=default, metavar="LEVEL",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        type=str.upper, help=f"log level (default {default})")


def broker_from_options(options: argparse.Namespace, name: str) -> BrokerSettings:
    return BrokerSettings.from_url(options.url, host=options.host, port=options.broker_port,
                                   vhost=options.vhost, user=options.user, name=name)


def setup_logging(options: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else getattr(logging, options.logging),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    # pika logs several ERROR lines for every failed connection attempt; crew logs one.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def on_stop_signals(stop: Callable[[], None], stop_now: Callable[[], None]) -> None:
    """On the running loop: the first SIGINT or SIGTERM calls ``stop()`` (a graceful stop),
    any later one ``stop_now()``; each is logged."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: stopping after running jobs (send it again to stop at once)",
                     signal.Signals(signum).name)
            stop()
        else:
            log.warning("%s again: stopping now; unfinished calls go back to their queues",
                        signal.Signals(signum).name)
            stop_now()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


if __name__ == "__main__":  # pragma: no cover
    print("run a worker module instead: python -m worker_example", file=sys.stderr)
    sys.exit(os.EX_USAGE)
