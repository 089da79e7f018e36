"""Tasks that ``tests/broker/test_command.py`` serves by file path:
``crew worker tests/support/command_tasks.py``. They go to crew's default registry, as an
operator's module of ``@Task`` functions does (no registry of its own)."""

from __future__ import annotations

import time
from typing import Any

from crew.worker import Task, context


@Task("cmd.echo")
def echo(req: Any) -> Any:
    return req


@Task("cmd.headers")
def headers(req: Any) -> Any:
    """The call's headers, as the task reads them."""
    return dict(context.headers)


@Task("cmd.boom")
def boom(req: Any) -> None:
    raise ValueError(f"bad {req}")


@Task("cmd.block")
def block(req: Any) -> Any:
    """Sleep in C for ``req`` seconds: the worker cannot interrupt it (its thread is stuck
    when the call's deadline passes first)."""
    time.sleep(float(req))
    return req


@Task("cmd.nap")
def nap(req: Any) -> Any:
    """Sleep ``req`` seconds in short naps, which the worker can interrupt."""
    end = time.monotonic() + float(req)
    while time.monotonic() < end:
        time.sleep(0.05)
    return req
