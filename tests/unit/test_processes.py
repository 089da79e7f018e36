"""The tests' child-process helper (:class:`tests.support.processes.Process`): a wait for a
line is bounded in all, however much else the process prints, and ends when the process
does."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.support.processes import Process

#: Prints a line every 20 ms, for ever.
CHATTY = "import itertools, time\nfor n in itertools.count():\n print(n, flush=True)\n" \
         " time.sleep(0.02)\n"


def started(code: str) -> Process:
    return Process(["-c", code], dict(os.environ))


def test_wait_for_finds_a_line_and_its_groups():
    process = started("print('hello'); print('port 8123', flush=True); input()")
    try:
        assert process.wait_for(r"port (\d+)", 30)[1] == "8123"
    finally:
        process.popen.kill()
        process.stop()
    assert process.text().startswith("hello\nport 8123\n")


def test_wait_for_is_bounded_in_all_while_the_process_keeps_printing():
    process = started(CHATTY)
    raised: list[AssertionError] = []

    def wait() -> None:
        try:
            process.wait_for("never", timeout=1)
        except AssertionError as exc:
            raised.append(exc)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    waiting.join(5)  # one line every 20 ms: a bound on each line's wait would never end
    assert process.stop() != 0  # SIGTERM
    assert raised and "no line matching 'never' within 1 s" in str(raised[0])
    assert "\n".join(map(str, range(10))) in process.text()


def test_wait_for_ends_when_the_process_exits_and_stays_ended():
    process = started("print('bye')")
    began = time.monotonic()
    for _ in range(2):
        with pytest.raises(AssertionError, match="exited before a line matching 'never'"):
            process.wait_for("never", timeout=30)
    assert time.monotonic() - began < 15
    assert process.stop() == 0 and process.text() == "bye\n"


def test_stop_kills_a_process_that_ignores_the_signal():
    process = started("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "print('ready', flush=True)\ntime.sleep(60)\n")
    process.wait_for("ready")
    assert process.stop(timeout=0.5) == -9
