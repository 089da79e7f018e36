"""The worker: ``@Task`` functions served from their queues, each job in a watched thread.

::

    from crew.worker import run, context, Task

    @Task('test')
    def long_task(req):
        context.settings.counter += 1
        return 'Wake up Neo.\\n'

    run(counter=0)

The article's import path, on top of every other module: it re-exports the worker's public
names and runs the worker's command line. :class:`Worker` (from :mod:`crew.serving`) is the
explicit API (embedding, tests; :func:`serve_in_thread`, here, runs one in a thread of its own);
:func:`run` parses the command line around it, ``--forks`` included (:mod:`crew.supervisor`),
and serves it until SIGINT or SIGTERM.

Below it, bottom up: :mod:`crew.jobs` (one call's job), :mod:`crew.context`,
:mod:`crew.pool` (job threads), :mod:`crew.replies` (how each call ends), :mod:`crew.calls`
(from delivery to job), :mod:`crew.session` (one connection's set-up),
:mod:`crew.serving` (the :class:`Worker`), :mod:`crew.cli` (argv, logging, signals).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from typing import Any, Mapping, Sequence

from . import metrics
from .cli import EXIT_STUCK as EXIT_STUCK
from .cli import broker_from_options, build_parser, on_stop_signals, setup_logging
from .context import Publisher as Publisher
from .context import context
from .exceptions import CrewError
from .registry import Task, TaskRegistry, tasks
from .serving import Worker
from .settings import DEFAULT_GRACE as DEFAULT_GRACE
from .settings import DEFAULT_MAX_MEMORY as DEFAULT_MAX_MEMORY
from .settings import DEFAULT_MAX_STUCK as DEFAULT_MAX_STUCK
from .settings import MIN_MAX_MEMORY as MIN_MAX_MEMORY

__all__ = ["Task", "TaskRegistry", "Worker", "context", "run", "serve_in_thread", "tasks"]
# Also importable from here, as before they moved (the ``X as X`` imports): EXIT_STUCK,
# Publisher and the worker's defaults.

# The logger the worker's command line always logged under.
log = logging.getLogger("crew")


def run(**settings: Any) -> None:
    """Parse the command line and serve the ``@Task`` registry until SIGINT or SIGTERM.

    Keyword arguments become ``context.settings``. See ``--help`` for the options.
    """
    main(tasks, settings)


def main(tasks: Mapping[str, Any], settings: Mapping[str, Any],
         argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse ``argv`` and serve ``tasks``; exits the process with the worker's status."""
    options = build_parser(prog).parse_args(argv)
    setup_logging(options)
    if options.concurrency < 1:
        sys.exit("--concurrency must be at least 1")
    if options.metrics_port is not None and not (
            0 < options.metrics_port <= 65535 - max(0, options.forks - 1)):
        sys.exit("--metrics-port must be a TCP port, with room for one port per fork")
    if options.forks > 0:
        from .supervisor import supervise  # here: multiprocessing costs every import of crew 5 ms

        sys.exit(supervise(options.forks, lambda slot: serve(tasks, settings, options, slot)))
    sys.exit(serve(tasks, settings, options))


def serve(tasks: Mapping[str, Any], settings: Mapping[str, Any],
          options: argparse.Namespace, slot: int = 0) -> int:
    """Run one worker in this process until a signal stops it; return the exit status.
    ``slot``: which of the ``--forks`` processes this is (its metrics port is N + slot)."""
    port = options.metrics_port
    try:
        worker = Worker(tasks, broker=broker_from_options(options, "crew-worker"),
                        concurrency=options.concurrency, max_priority=options.max_priority,
                        settings=settings, options=options, max_stuck=options.max_stuck,
                        grace=options.grace, max_memory=options.max_memory * 1024 * 1024,
                        queue_type=options.queue_type, metrics=True if port else None)
        if port:
            metrics.serve(port + slot)
            log.info("metrics on http://0.0.0.0:%d/metrics", port + slot)
    except (TypeError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return asyncio.run(_serve_with_signals(worker))


async def _serve_with_signals(worker: Worker) -> int:
    on_stop_signals(worker.request_stop, lambda: worker.request_stop(grace=0))
    try:
        reason = await worker.serve()
    except CrewError as exc:
        log.error("worker stopped: %s", exc)
        return 1
    return {"stopped": 0, "stuck": EXIT_STUCK}.get(reason, 1)


def serve_in_thread(worker: Worker, timeout: float | None = None) -> threading.Thread:
    """Run ``worker`` on a loop of its own in a daemon thread (embedding and tests); return
    once it consumes, or raise why it could not start (``timeout``: as :meth:`Worker.start`'s).
    Stop it with ``worker.request_stop()`` and join the thread."""
    started = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        try:
            await worker.start(timeout)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            failure.append(exc)
            return
        finally:
            started.set()
        await worker.serve()  # started: it serves

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="crew-worker", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        raise failure[0]
    return thread
