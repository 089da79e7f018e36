"""``--forks N``: N worker processes under a supervisor that restarts the dead ones.

The supervisor only forks, waits and forwards signals; it opens no broker connection. A
child that exits by itself (a crash, a kill, too many stuck job threads) is started again,
after a delay that doubles, up to a cap, while it keeps dying young. SIGTERM or SIGINT is
forwarded to every child for a graceful stop; a second one is forwarded too, which makes
the children stop at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from typing import Callable

log = logging.getLogger(__name__)

#: A child that lived at least this long resets its restart delay.
HEALTHY_AFTER = 30.0
FIRST_DELAY = 0.5
MAX_DELAY = 30.0


class _Slot:
    def __init__(self, number: int) -> None:
        self.number = number
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.delay = 0.0
        self.restart_at = 0.0  # monotonic time; 0 = now


def supervise(count: int, target: Callable[[int], int]) -> int:
    """Keep ``count`` processes running ``target(slot)`` (slot 0 to ``count`` - 1: a restarted
    process keeps its slot) until a signal; return 0 when all stopped."""
    context = multiprocessing.get_context("fork")
    slots = [_Slot(n) for n in range(count)]
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if signals:
                return _stop_all(slots, signals, read_fd)
            now = time.monotonic()
            for slot in slots:
                if slot.process is None and slot.restart_at <= now:
                    _start(context, slot, target)
            _wait(slots, read_fd)
            _reap(slots)
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(read_fd)
        os.close(write_fd)


def _child(target: Callable[[int], int], slot: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)  # the worker installs its own handlers
    signal.set_wakeup_fd(-1)
    raise SystemExit(target(slot))


def _start(context: multiprocessing.context.ForkContext, slot: _Slot,
           target: Callable[[int], int]) -> None:
    slot.process = context.Process(target=_child, args=(target, slot.number),
                                   name=f"crew-worker-{slot.number}")
    slot.process.start()
    slot.started = time.monotonic()
    log.info("supervisor started worker process %d (slot %d)", slot.process.pid, slot.number)


def _wait(slots: list[_Slot], read_fd: int) -> None:
    """Block until a child exits, a signal arrives, or a delayed restart is due."""
    sentinels: list[int] = [s.process.sentinel for s in slots if s.process is not None]
    due = [s.restart_at for s in slots if s.process is None]
    timeout = max(0.0, min(due) - time.monotonic()) if due else None
    ready = multiprocessing.connection.wait([*sentinels, read_fd], timeout)
    if read_fd in ready:
        os.read(read_fd, 512)


def _reap(slots: list[_Slot]) -> None:
    for slot in slots:
        process = slot.process
        if process is None or process.is_alive():
            continue
        process.join()
        lived = time.monotonic() - slot.started
        slot.delay = 0.0 if lived >= HEALTHY_AFTER else min(
            MAX_DELAY, max(FIRST_DELAY, slot.delay * 2))
        slot.restart_at = time.monotonic() + slot.delay * random.uniform(0.8, 1.2)
        log.warning("worker process %d exited with status %s after %.1f s; restarting in %.1f s",
                    process.pid, process.exitcode, lived, slot.restart_at - time.monotonic())
        slot.process = None


def _stop_all(slots: list[_Slot], signals: list[int], read_fd: int) -> int:
    forwarded = 0
    while True:
        alive = [s.process for s in slots if s.process is not None and s.process.is_alive()]
        if not alive:
            log.info("supervisor: every worker process stopped")
            return 0
        while forwarded < len(signals):
            signum = signals[forwarded]
            forwarded += 1
            log.info("supervisor forwards %s to %d worker process(es)",
                     signal.Signals(signum).name, len(alive))
            for process in alive:
                if process.pid is not None:
                    os.kill(process.pid, signum)
        ready = multiprocessing.connection.wait([*(p.sentinel for p in alive), read_fd])
        if read_fd in ready:
            os.read(read_fd, 512)
