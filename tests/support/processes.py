"""Child Python processes for tests: this checkout importable, the test vhost in
``$CREW_URL`` (never on a command line), their output read line by line, their stop."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

#: The checkout's root directory.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: What the article's ``stat`` task answers: the worker's uuid, the calls it has served.
STAT = r"I'm worker \"([0-9a-f]{32})\"\. And I serve (\d+) tasks"


def python_env(broker_url: str) -> dict[str, str]:
    """Environment for a child Python process: this checkout importable, the test vhost."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["CREW_URL"] = broker_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_python(args: list[str], broker_url: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``python ARGS`` with the test vhost in ``$CREW_URL`` (never on the command line)."""
    return subprocess.Popen([sys.executable, *args], env=python_env(broker_url), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


async def until(condition: Callable[[], bool], changed: asyncio.Event,
                timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, re-checking each time ``changed`` is set."""
    async def wait() -> None:
        while not condition():
            changed.clear()
            await changed.wait()
    await asyncio.wait_for(wait(), timeout)


class Output:
    """A child's output lines, read by a thread; ``await wait_for(text)`` for the next line
    that contains ``text``."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, line)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)
        except RuntimeError:
            pass  # the test's loop is closed: a fixture stopped the process after the test

    async def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The first line printed from now on that contains ``text``, within ``timeout``
        seconds in all (however many other lines come meanwhile); raise if the output ends."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(self.queue.get(),
                                              max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise AssertionError(f"no line with {text!r} within {timeout} s:\n"
                                     f"{''.join(self.seen)}") from None
            if line is None:
                raise AssertionError(f"exited before printing {text!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            if text in line:
                return line

    def everything(self) -> str:
        """All the output read so far, once the process has exited."""
        while not self.queue.empty():
            self.seen.append(self.queue.get_nowait() or "")
        return "".join(self.seen)


async def stop(proc: subprocess.Popen[str], output: Output) -> int:
    """SIGTERM ``proc`` and return its exit status (it is killed if it does not exit)."""
    loop = asyncio.get_running_loop()
    proc.send_signal(signal.SIGTERM)
    try:
        code = await loop.run_in_executor(None, proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = await loop.run_in_executor(None, proc.wait)
    await loop.run_in_executor(None, output.thread.join, 10)
    return code


class Process:
    """A child Python process (``python ARGS``) whose output lines (standard error merged)
    are read in a thread, so tests can wait for one without an event loop."""

    def __init__(self, args: list[str], env: dict[str, str], **kwargs: Any) -> None:
        self.popen = subprocess.Popen([sys.executable, *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      **kwargs)
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)  # the end of the output

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first match of ``pattern`` in a line printed from now on, within ``timeout``
        seconds in all (however many other lines come meanwhile); raise if the output ends."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n"
                                     f"{self.text()}") from None
            if line is None:
                self.lines.put(None)  # for the next wait_for: the output stays ended
                raise AssertionError(f"the process exited before a line matching "
                                     f"{pattern!r}:\n{self.text()}")
            match = re.search(pattern, line)
            if match:
                return match

    def text(self) -> str:
        """The output read so far: all of it once :meth:`stop` has returned."""
        return "".join(self.output)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send ``sig`` and return the exit status; killed if it has not exited within
        ``timeout`` seconds. The output is then read to its end."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait(10)
        self.reader.join(10)
        return code


def kill_alive(processes: list[Process]) -> None:
    """Kill those of ``processes`` that still run (a fixture's clean-up after its test)."""
    for process in processes:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait(10)
