"""The job threads of a worker (internal).

Every job of a sync task runs in a *job thread* of a :class:`JobThreads` pool sized to the
worker's concurrency; the event loop that owns the AMQP connection never runs task code, so
heartbeats keep flowing however long a job takes. A thread hands the outcome back to the
loop, which publishes the reply and acknowledges the call.

When the loop gives up on a running job (deadline, cancellation), it raises
:class:`~crew.JobKilled` in the job's thread and at once frees the thread's slot for a fresh
thread: a job blocked in C (``time.sleep(3600)``) cannot be interrupted and must not hold the
slot. The abandoned thread retires as soon as its job returns; while it has not, it counts as
*stuck*.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from typing import Callable, Final

from .exceptions import JobKilled
from .jobs import Job, Reply

log = logging.getLogger(__name__)


class JobThreads:
    """A pool of at most ``size`` job threads that wakes the most recently idle one for a job.

    Jobs wait in one queue, in submission order. A thread that finishes a job takes the next
    one without sleeping, so a burst of short jobs is mostly run by the threads already awake;
    a thread is woken, or spawned when none is idle, only while no other is on its way to the
    queue. A woken thread that takes a job and leaves more waiting wakes the next (a cascade)
    before it runs its own, so blocking jobs still get a thread each, a wake-up apart.
    """

    def __init__(self, size: int, name: str,
                 on_done: Callable[[Job, Reply], None]) -> None:
        self._size = size
        self._name = name
        self._on_done = on_done
        self._lock = threading.Lock()
        self._pending: deque[Job] = deque()
        # The wake-up locks of idle threads (held; released to wake one), a stack: a lightly
        # loaded worker keeps its jobs on the few threads on top, with warm caches, and leaves
        # the others untouched. glibc gives each thread a malloc arena: 1 MB jobs rotated over
        # 64 threads kept ~200 MiB.
        self._idle: list[threading.Lock] = []
        # The wake-up locks of threads woken or spawned that have not yet looked at the
        # queue. While one is on its way, a new job wakes no other: that thread takes the
        # first job waiting and wakes the next if more wait. Waking a thread for every job of
        # a burst cost 5-10 times the CPU per short job (bench/pool.py), ~35 us per call with
        # 64 calls in flight. A set, not a count: a thread that ends leaves it for sure.
        self._waking: set[threading.Lock] = set()
        self._threads: set[threading.Thread] = set()
        #: Threads whose job was abandoned and has not returned yet.
        self.stuck: set[threading.Thread] = set()
        self._serial = 0
        self._closed = False

    def submit(self, job: Job) -> None:
        """Queue ``job`` and make sure a thread is on its way to it, if one can be."""
        with self._lock:
            self._pending.append(job)
            self._kick()

    def replace(self, thread: threading.Thread) -> None:
        """``thread``'s job was abandoned: count it as stuck and free its slot."""
        with self._lock:
            if thread in self._threads:
                self._threads.discard(thread)
                self.stuck.add(thread)
                self._kick()  # a job may wait for this slot; else the next submit fills it

    def _kick(self) -> None:
        """With the lock held: if jobs wait and no thread is on its way to them, wake the most
        recently idle thread, else spawn one if there is room."""
        if not self._pending or self._waking:
            return
        if self._idle:
            wake = self._idle.pop()
            self._waking.add(wake)
            wake.release()
        elif len(self._threads) < self._size:
            self._spawn()

    def _spawn(self) -> None:
        self._serial += 1
        wake = threading.Lock()
        wake.acquire()
        # A daemon: a stuck job must not keep the process alive.
        thread = threading.Thread(target=self._serve, args=(wake,), daemon=True,
                                  name=f"{self._name}-{self._serial}")
        try:
            thread.start()
        except RuntimeError:  # out of threads: the jobs wait for a running one, or a retry
            log.exception("job thread %s could not be started", thread.name)
            return
        self._threads.add(thread)
        self._waking.add(wake)  # a new thread's first act is to look at the queue

    def _serve(self, wake: threading.Lock) -> None:
        me = threading.current_thread()
        job: Job | _Idle | None = None  # what the thread has taken and not yet begun
        try:
            job = self._woken(wake)
            while job is not None:
                if job is _IDLE:
                    wake.acquire()
                    job = self._woken(wake)
                    continue
                running, job = job, None
                running.thread = me  # before begin(): the loop reads it once it is running
                reply, abandoned = self._run(running)
                if abandoned:
                    break  # the loop answered already and freed this thread's slot
                # Ready before the reply goes out: a call sent in answer to it then finds this
                # thread idle rather than spawning another.
                with self._lock:
                    job = self._next(wake)
                if reply is not None:
                    self._on_done(running, reply)
        finally:
            self._retire(me, wake, job)

    def _woken(self, wake: threading.Lock) -> Job | _Idle | None:
        """A woken or new thread's look at the queue: as :meth:`_next`."""
        with self._lock:
            self._waking.discard(wake)
            return self._next(wake)

    def _next(self, wake: threading.Lock) -> Job | _Idle | None:
        """With the lock held: a free thread's next job, else IDLE (its ``wake`` is pushed on
        the idle stack), else None (the pool is closed: the thread exits)."""
        if self._pending:
            job = self._pending.popleft()
            self._kick()  # more jobs wait: another thread goes for them, not after this job
            return job
        if self._closed:
            return None
        self._idle.append(wake)
        return _IDLE

    def _retire(self, me: threading.Thread, wake: threading.Lock,
                job: Job | _Idle | None) -> None:
        with self._lock:
            self._threads.discard(me)
            self.stuck.discard(me)
            # Only if a bug in crew ended the thread: it leaves the idle stack (or the threads
            # on their way), and a job it took but did not begin goes back to the queue's head.
            if wake in self._idle:
                self._idle.remove(wake)
            self._waking.discard(wake)
            if isinstance(job, Job):
                self._pending.appendleft(job)
            self._kick()  # a slot is free, if replace() did not free it already

    @staticmethod
    def _run(job: Job) -> tuple[Reply | None, bool]:
        """Run ``job``; return its reply (None if it was abandoned before it began) and
        whether the loop abandoned it while it ran."""
        try:
            # begin() inside the try: the kill may land as soon as it has marked the job
            # running, before it even returns.
            if not job.watch.begin():
                return None, False
            try:
                reply = job.run_sync()
            except JobKilled as exc:  # landed after the task's code, or raised by the task
                reply = job.error_reply(exc, with_traceback=False)
            except Exception as exc:  # a bug in crew itself: tell the caller, keep serving
                log.exception("job %s of task %s failed inside crew", job.correlation_id,
                              job.task)
                reply = job.error_reply(exc, with_traceback=False)
            return reply, job.watch.end(JobKilled)
        except JobKilled as exc:
            # The kill (sent at most once per job) landed in the lines above, outside the
            # task, or as end() was entered; it is spent, so end() cannot be hit again.
            return job.error_reply(exc, with_traceback=False), job.watch.end(JobKilled)

    def close(self) -> None:
        """Let idle threads exit, and busy ones once no job is pending; stuck ones are
        daemons and die with the process."""
        with self._lock:
            self._closed = True
            for wake in self._idle:
                self._waking.add(wake)
                wake.release()
            self._idle.clear()

    def drain_pending(self) -> list[Job]:
        """Remove and return the jobs that no thread has taken yet."""
        with self._lock:
            jobs = list(self._pending)
            self._pending.clear()
        return jobs


class _Idle(enum.Enum):
    """What a free thread gets when no job waits: it sleeps until woken."""

    IDLE = "idle"


_IDLE: Final = _Idle.IDLE  # a module global: an enum member's lookup costs 60 ns
