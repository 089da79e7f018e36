"""The thread kill (crew.threads) and the job thread pool (crew.jobs), without a broker."""

from __future__ import annotations

import queue
import random
import sys
import threading
import time

from crew import JobKilled, codec, protocol
from crew.jobs import Job, JobThreads
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


# --- the job thread pool (crew.jobs.JobThreads) -------------------------------------------

class _Pool:
    """A JobThreads pool of real threads running real jobs, with what it did recorded."""

    _count = 0

    def __init__(self, size: int) -> None:
        _Pool._count += 1
        self.name = f"test-pool-{_Pool._count}"
        self.pool = JobThreads(size, self.name, self._done)
        self.ran_on: dict[str, threading.Thread] = {}  # correlation id -> thread
        self.started: queue.SimpleQueue = queue.SimpleQueue()  # correlation ids, in order
        self.done: dict[str, threading.Event] = {}  # set once on_done got the reply
        self.statuses: dict[str, str] = {}
        self.gates: dict[str, threading.Event] = {}

    def _done(self, job, reply) -> None:
        self.statuses[job.correlation_id] = reply.status
        self.done[job.correlation_id].set()

    def submit(self, cid: str, *, gated: bool = False) -> Job:
        """Submit job ``cid``; a gated one runs until ``release(cid)``."""
        gate = self.gates[cid] = threading.Event()
        if not gated:
            gate.set()
        self.done[cid] = threading.Event()

        def task(_argument):
            self.ran_on[cid] = threading.current_thread()
            self.started.put(cid)
            assert gate.wait(10)
            return cid

        body, _ = codec.encode(None)
        job = Job(None, "t", task, 1, cid, "reply", protocol.MSGPACK, None, body, {},
                  time.monotonic() + 60)
        self.pool.submit(job)
        return job

    def run(self, cid: str) -> None:
        """Submit job ``cid`` and wait until its reply is handed over."""
        self.submit(cid)
        assert self.done[cid].wait(10) and self.statuses[cid] == protocol.STATUS_OK
        assert self.next_started() == cid

    def release(self, cid: str) -> None:
        self.gates[cid].set()
        assert self.done[cid].wait(10) and self.statuses[cid] == protocol.STATUS_OK

    def next_started(self) -> str:
        return self.started.get(timeout=10)

    def threads(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(self.name + "-")]

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.pool.close()
        for thread in self.threads():
            thread.join(10)
        assert self.threads() == []


def test_sequential_jobs_run_on_one_thread():
    pool = _Pool(4)
    for i in range(6):
        pool.run(f"job{i}")
    assert len(set(pool.ran_on.values())) == 1
    assert len(pool.threads()) == 1
    pool.close()


def test_blocked_jobs_use_one_thread_each_up_to_the_size_then_wait_in_order():
    pool = _Pool(3)
    pool.run("warm")  # leaves one idle thread
    pool.submit("a", gated=True)
    pool.submit("b", gated=True)
    assert {pool.next_started(), pool.next_started()} == {"a", "b"}
    assert len(pool.threads()) == 2  # the idle thread was used, one more spawned
    assert pool.ran_on["a"] is pool.ran_on["warm"]
    for cid in ("c", "d", "e"):
        pool.submit(cid, gated=True)
    assert pool.next_started() == "c"
    assert len(pool.threads()) == 3  # full: d and e wait
    assert pool.started.empty()
    pool.release("a")
    assert pool.next_started() == "d"  # on the thread a freed
    assert pool.ran_on["d"] is pool.ran_on["a"]
    pool.release("b")
    assert pool.next_started() == "e"
    assert pool.ran_on["e"] is pool.ran_on["b"]
    assert len(pool.threads()) == 3
    pool.close()


def test_the_most_recently_idle_thread_gets_the_next_job():
    pool = _Pool(3)
    for cid in ("a", "b", "c"):
        pool.submit(cid, gated=True)
    for _ in range(3):
        pool.next_started()
    for cid in ("b", "a", "c"):  # idle in this order: c is on top, then a
        pool.release(cid)
    pool.submit("x", gated=True)
    assert pool.next_started() == "x"
    pool.submit("y", gated=True)
    assert pool.next_started() == "y"
    assert pool.ran_on["x"] is pool.ran_on["c"]
    assert pool.ran_on["y"] is pool.ran_on["a"]
    pool.close()


def test_close_lets_idle_threads_exit_and_busy_ones_after_their_job():
    pool = _Pool(2)
    pool.submit("a", gated=True)
    pool.submit("b", gated=True)
    assert {pool.next_started(), pool.next_started()} == {"a", "b"}
    waiting = [pool.submit("c"), pool.submit("d")]
    assert pool.pool.drain_pending() == waiting
    assert pool.pool.drain_pending() == []
    pool.release("a")
    idle, busy = pool.ran_on["a"], pool.ran_on["b"]
    pool.pool.close()
    idle.join(10)
    assert not idle.is_alive() and busy.is_alive()
    pool.release("b")
    busy.join(10)
    assert not busy.is_alive()
    assert set(pool.ran_on) == {"a", "b"}  # the drained jobs never ran
    assert all(job.watch.state == "pending" for job in waiting)


def test_an_abandoned_job_frees_its_slot_and_its_thread_retires_when_it_returns():
    pool = _Pool(1)
    stuck = pool.submit("stuck", gated=True)
    pool.next_started()
    assert stuck.watch.abandon(JobKilled) == "running"  # lands when the task's wait returns
    pool.pool.replace(stuck.thread)
    assert pool.pool.stuck == {stuck.thread}
    pool.run("next")  # the slot is free: a fresh thread serves it
    assert pool.ran_on["next"] is not stuck.thread
    pool.gates["stuck"].set()
    stuck.thread.join(10)
    assert not stuck.thread.is_alive() and pool.pool.stuck == set()
    assert not pool.done["stuck"].is_set()  # the loop answers an abandoned job, not the pool
    pool.close()


def test_kills_at_random_moments_never_break_the_pool():
    """Abandon jobs at random moments, as the loop does at a deadline, and replace the
    thread of each one abandoned while running: whatever bytecode the kill lands on, no
    thread dies of it, every job ends once, and the pool keeps serving."""
    died: list = []
    outcomes: dict[str, list] = {}
    pool = JobThreads(4, "test-pool-kills", lambda job, reply: outcomes[job.correlation_id]
                      .append(reply.status))
    previous_hook, threading.excepthook = threading.excepthook, died.append

    def spin(_argument):
        for _ in range(random.randint(0, 10000)):
            pass

    class Watch(Interruptible):  # tells the test that a thread took the job
        def __init__(self) -> None:
            super().__init__()
            self.taken = threading.Event()

        def begin(self) -> bool:
            self.taken.set()
            return super().begin()

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        states = []
        for i in range(600):
            body, _ = codec.encode(None)
            job = Job(None, "t", spin, 1, str(i), "reply", protocol.MSGPACK, None, body,
                      {}, time.monotonic() + 60)
            job.watch, outcomes[str(i)] = Watch(), []
            pool.submit(job)
            if i % 2:  # else it may still be pending, which must work too
                job.watch.taken.wait(5)
            for _ in range(random.randint(0, 5000)):
                pass
            state = job.watch.abandon(JobKilled)
            states.append(state)
            if state == "running":
                pool.replace(job.thread)
        pool.close()
        for thread in threading.enumerate():
            if thread.name.startswith("test-pool-kills-"):
                thread.join(10)
                assert not thread.is_alive()
    finally:
        sys.setswitchinterval(switch_interval)
        threading.excepthook = previous_hook
    assert died == [] and pool.stuck == set()
    for state, ends in zip(states, outcomes.values()):
        assert ends == (["ok"] if state == "ended" else [])
    assert "running" in states and "ended" in states  # the races were really run
