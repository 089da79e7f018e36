"""The thread kill (crew.threads), without a broker."""

from __future__ import annotations

import queue
import random
import sys
import threading
import time

from crew import JobKilled
from crew.threads import Interruptible


def _run_in_thread(target):
    result: dict = {}

    def wrapper():
        try:
            result["value"] = target()
        except BaseException as exc:  # report everything, the kill included
            result["error"] = exc

    thread = threading.Thread(target=wrapper, daemon=True)
    thread.start()
    return thread, result


def test_a_running_pure_python_loop_is_interrupted():
    work, looping = Interruptible(), threading.Event()

    def job():
        work.begin()
        try:
            while True:
                looping.set()
        except JobKilled:
            return "killed", work.end(JobKilled)

    thread, result = _run_in_thread(job)
    assert looping.wait(5)
    assert work.abandon(JobKilled) == "running"
    thread.join(5)
    assert result == {"value": ("killed", True)}
    assert work.interrupted


def test_work_abandoned_before_it_began_never_begins():
    work = Interruptible()
    assert work.abandon(JobKilled) == "pending"
    assert work.begin() is False
    assert not work.interrupted


def test_ended_work_is_left_alone():
    work = Interruptible()
    assert work.begin()
    assert work.end(JobKilled) is False
    assert work.abandon(JobKilled) == "ended"
    assert not work.interrupted


def test_a_blocking_call_is_not_interrupted_until_it_returns():
    work = Interruptible()
    began = threading.Event()

    def job():
        work.begin()
        began.set()
        started = time.monotonic()
        try:
            time.sleep(0.3)  # C code: the exception waits until it returns
            for _ in range(1000):
                pass
        except JobKilled:
            return time.monotonic() - started, work.end(JobKilled)
        return None

    thread, result = _run_in_thread(job)
    assert began.wait(5)
    assert work.abandon(JobKilled) == "running"
    thread.join(5)
    took, abandoned = result["value"]
    assert took >= 0.3 and abandoned


def test_the_kill_never_lands_after_the_work_ended():
    """Abandon at random moments around the end of short jobs; whatever the timing, no
    JobKilled reaches the code that runs after end()."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    leaks: list[int] = []
    done = threading.Event()

    def worker():
        rounds = 0
        while True:
            work, taken = jobs.get()
            if work is None:
                break
            taken.set()
            if work.begin():
                try:  # the pattern the Interruptible docstring prescribes
                    try:
                        for _ in range(random.randint(0, 20000)):
                            pass
                    except JobKilled:
                        pass
                    work.end(JobKilled)
                except JobKilled:
                    work.end(JobKilled)
            try:
                for _ in range(3000):  # the worker's own code: the kill must not land here
                    pass
            except JobKilled:
                leaks.append(rounds)
            rounds += 1
        done.set()

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: more interleavings
    try:
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        states = set()
        for _ in range(800):
            work, taken = Interruptible(), threading.Event()
            jobs.put((work, taken))
            taken.wait(5)
            for _ in range(random.randint(0, 20000)):
                pass
            states.add(work.abandon(JobKilled))
        jobs.put((None, None))
        assert done.wait(30)
    finally:
        sys.setswitchinterval(switch_interval)
    assert leaks == []
    assert "running" in states  # the race was really exercised


def test_end_clears_a_kill_that_is_still_pending():
    """Force the worst timing: the kill is sent while the job thread waits for the lock
    inside end(); it must be absorbed there, never reach the code after end()."""
    from crew import threads

    work = Interruptible()
    began, locked = threading.Event(), threading.Event()
    outcome: dict = {}

    def job():
        work.begin()
        began.set()
        locked.wait(5)
        abandoned = work.end(JobKilled)  # blocks on the lock the test holds
        try:
            for _ in range(100_000):  # the worker's own code
                pass
            outcome["after"] = "clean"
        except JobKilled:
            outcome["after"] = "leaked"
        outcome["abandoned"] = abandoned

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    assert began.wait(5)
    with work._lock:
        locked.set()
        time.sleep(0.05)  # let the job thread reach the lock inside end()
        # What abandon() does, done by hand while end() is blocked: mark and send.
        work.state = "abandoned"
        work.interrupted = threads._send(thread.ident, JobKilled)
    thread.join(5)
    assert work.interrupted
    assert outcome == {"after": "clean", "abandoned": True}
