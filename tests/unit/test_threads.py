"""The thread kill (crew.threads) and the job thread pool (crew.pool), without a broker."""

from __future__ import annotations

import queue
import random
import sys
import threading
import time

from crew import JobKilled, codec, protocol
from crew.jobs import Job
from crew.pool import JobThreads
from crew.threads import Interruptible


def _run_in_thread(target):
    result: dict = {}

    def wrapper():
        try:
            result["value"] = target()
        except BaseException as exc:  # noqa: BLE001 - report everything, the kill included
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
            try:  # the pattern the Interruptible docstring prescribes, begin() inside
                if work.begin():
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
            # A worker thread that a kill ended would leave every later round waiting.
            assert taken.wait(5), "the worker thread died (see its traceback above)"
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


# --- the job thread pool (crew.pool.JobThreads) ------------------------------------------

class _Pool:
    """A JobThreads pool of real threads running real jobs, with what it did recorded."""

    _count = 0

    def __init__(self, size: int, *, holdable: bool = False) -> None:
        _Pool._count += 1
        self.name = f"test-pool-{_Pool._count}"
        self.pool = JobThreads(size, self.name, self._done)
        if holdable:
            # Reentrant, so that the test can submit while it holds the pool's lock and no
            # thread of the pool can look at the queue (see hold()).
            self.pool._lock = threading.RLock()  # type: ignore[assignment]
        self.ran_on: dict[str, threading.Thread] = {}  # correlation id -> thread
        self.started: queue.SimpleQueue = queue.SimpleQueue()  # correlation ids, in order
        self.done: dict[str, threading.Event] = {}  # set once on_done got the reply
        self.statuses: dict[str, str] = {}
        self.gates: dict[str, threading.Event] = {}
        self.finished: list[str] = []  # correlation ids, once per on_done

    def _done(self, job, reply) -> None:
        self.finished.append(job.correlation_id)
        self.statuses[job.correlation_id] = reply.status
        self.done[job.correlation_id].set()

    def hold(self):
        """Hold the pool's lock: jobs submitted meanwhile wait, and every thread that is woken
        or spawned stops before it looks at the queue, until the hold ends."""
        return self.pool._lock

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

    def make_idle(self, count: int) -> list[threading.Thread]:
        """Leave ``count`` idle threads; return them, the most recently idle last."""
        cids = [f"idle{i}" for i in range(count)]
        for cid in cids:
            self.submit(cid, gated=True)
        assert {self.next_started() for _ in cids} == set(cids)  # a thread each
        for cid in cids:
            self.release(cid)
        return [self.ran_on[cid] for cid in cids]

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


def test_a_burst_submitted_before_any_thread_looks_at_the_queue_spawns_one_thread():
    pool = _Pool(64, holdable=True)
    cids = [f"j{i}" for i in range(64)]
    with pool.hold():
        for cid in cids:
            pool.submit(cid)
        assert len(pool.threads()) == 1  # the others would find the jobs taken already
    for cid in cids:
        assert pool.done[cid].wait(10)
    assert sorted(pool.finished) == sorted(cids)
    pool.close()


def test_a_burst_wakes_only_the_most_recently_idle_thread():
    pool = _Pool(8, holdable=True)
    idle = pool.make_idle(4)
    with pool.hold():
        for cid in ("a", "b", "c", "d"):
            pool.submit(cid)
        assert len(pool.pool._idle) == 3  # one woken, for all four
    for cid in ("a", "b", "c", "d"):
        assert pool.done[cid].wait(10)
    # The woken thread is the only one that can look at the queue first: it takes "a".
    assert pool.ran_on["a"] is idle[-1]
    assert len(pool.threads()) == 4
    pool.close()


def test_blocking_jobs_of_a_burst_each_get_a_thread_though_one_was_woken():
    """The woken thread wakes (or spawns) the next before it runs its own job, and so on:
    jobs that block do not wait behind each other while a slot is free."""
    pool = _Pool(8, holdable=True)
    pool.run("warm")  # one idle thread
    cids = ["a", "b", "c", "d", "e", "f"]
    with pool.hold():
        for cid in cids:
            pool.submit(cid, gated=True)
        assert len(pool.threads()) == 1
    assert {pool.next_started() for _ in cids} == set(cids)  # all six at once
    assert len(pool.threads()) == 6 and len({pool.ran_on[cid] for cid in cids}) == 6
    assert pool.ran_on["a"] is pool.ran_on["warm"]
    pool.run("short")  # two slots are free: no wait behind the six
    for cid in cids:
        pool.release(cid)
    assert sorted(pool.finished) == sorted(cids + ["warm", "short"])
    pool.close()


def test_one_thread_runs_the_waiting_jobs_in_submission_order_once_each():
    pool = _Pool(1)
    pool.submit("first", gated=True)
    assert pool.next_started() == "first"
    cids = [f"j{i}" for i in range(30)]
    for cid in cids:
        pool.submit(cid)
    pool.release("first")
    assert [pool.next_started() for _ in cids] == cids
    for cid in cids:
        assert pool.done[cid].wait(10)
    assert pool.finished == ["first"] + cids
    assert len(pool.threads()) == 1
    pool.close()


def test_close_during_a_cascade_leaves_no_job_behind_and_no_thread_running():
    pool = _Pool(4, holdable=True)
    pool.make_idle(3)
    with pool.hold():
        pool.submit("x", gated=True)
        pool.submit("y", gated=True)
        pool.pool.close()  # wakes the other idle threads too; the one without a job exits
    assert {pool.next_started(), pool.next_started()} == {"x", "y"}
    pool.release("x")
    pool.release("y")
    pool.close()  # joins every thread of the pool
    assert sorted(pool.finished) == ["idle0", "idle1", "idle2", "x", "y"]


def test_a_job_waiting_for_the_slot_of_an_abandoned_job_gets_a_new_thread():
    pool = _Pool(1)
    stuck = pool.submit("stuck", gated=True)
    pool.next_started()
    pool.submit("next")
    assert stuck.watch.abandon(JobKilled) == "running"
    pool.pool.replace(stuck.thread)
    assert pool.done["next"].wait(10)  # while the stuck job still blocks
    assert pool.ran_on["next"] is not stuck.thread and stuck.thread.is_alive()
    pool.gates["stuck"].set()
    stuck.thread.join(10)
    assert pool.pool.stuck == set() and pool.finished == ["next"]
    pool.close()


def test_an_abandoned_thread_that_ends_before_replace_passes_its_slot_on():
    """The loop calls replace() just after the kill; the killed thread may end first."""
    pool = _Pool(1)
    killed = pool.submit("killed", gated=True)
    pool.next_started()
    pool.submit("next")
    assert killed.watch.abandon(JobKilled) == "running"  # lands as the task's wait returns
    pool.gates["killed"].set()
    killed.thread.join(10)
    assert not killed.thread.is_alive()
    assert pool.done["next"].wait(10)
    pool.pool.replace(killed.thread)  # too late: changes nothing
    assert pool.pool.stuck == set() and pool.finished == ["next"]
    pool.close()


def test_no_job_waits_while_a_thread_could_take_it():
    """Short and blocking jobs from three threads, some abandoned at once, with threads
    switched as often as CPython can: whenever the pool's lock is free, a job that waits has
    a thread on its way to it, or every slot is busy; every job ends once."""
    pool = _Pool(4)
    pools = pool.pool
    lost: list = []
    stop = threading.Event()

    def watch():  # takes the pool's lock as often as it can and checks the pool's state
        while not stop.is_set():
            with pools._lock:
                if pools._pending and not pools._waking and (
                        pools._idle or len(pools._threads) < pools._size):
                    lost.append((len(pools._pending), len(pools._idle), len(pools._threads)))

    def task(_argument):
        if random.random() < 0.2:
            time.sleep(0.0005)  # blocks, the GIL released
        else:
            for _ in range(random.randint(0, 300)):
                pass
        return None

    abandoned: dict[str, str] = {}

    def submit_jobs(prefix: str) -> None:
        for i in range(300):
            cid = f"{prefix}{i}"
            body, _ = codec.encode(None)
            job = Job(None, "t", task, 1, cid, "reply", protocol.MSGPACK, None, body, {},
                      time.monotonic() + 60)
            pool.done[cid] = threading.Event()
            pools.submit(job)
            if random.random() < 0.1:
                abandoned[cid] = state = job.watch.abandon(JobKilled)
                if state == "running":
                    pools.replace(job.thread)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        submitters = [threading.Thread(target=submit_jobs, args=(p,)) for p in "abc"]
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join(30)
        for cid, done in pool.done.items():
            if abandoned.get(cid, "ended") == "ended":
                assert done.wait(10), cid
    finally:
        stop.set()
        watcher.join(10)
        sys.setswitchinterval(switch_interval)
    assert lost == []
    pool.close()
    expected = [cid for cid in pool.done if abandoned.get(cid, "ended") == "ended"]
    assert sorted(pool.finished) == sorted(expected)


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
    for state, ends in zip(states, outcomes.values(), strict=True):
        assert ends == (["ok"] if state == "ended" else [])
    assert "running" in states and "ended" in states  # the races were really run
