"""``SyncClient`` and its loop thread where no broker answers (against RabbitMQ:
tests/broker/test_sync_client.py, the WSGI example: tests/broker/test_wsgi_example.py)."""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import crew
from crew.loopthread import LoopThread, PerProcess
from crew.pending import ThreadCall
from crew.sync import SyncClient
from crew.syncruntime import HOP_MARGIN
from tests.support.connect import refused_port, silent_port
from tests.support.processes import ROOT

#: What a busy 2-core machine may add to a bound measured here.
SLACK = 2.0


def url(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


# --- the loop thread and what belongs to one process ------------------------------------

def test_loop_thread_runs_what_it_is_handed_and_its_stop_cancels_the_rest():
    thread = LoopThread("test-loop")
    quick = thread.submit(asyncio.sleep(0, "done"))
    assert quick.wait(10) and quick.outcome() == "done"
    slow = thread.submit(asyncio.sleep(60))
    assert thread.stop(10)
    assert slow.wait(10)
    with pytest.raises(asyncio.CancelledError):
        slow.outcome()
    late = asyncio.sleep(0)
    with pytest.raises(crew.ConnectionLostError):
        thread.submit(late)
    assert thread.loop.is_closed()


def test_work_cancelled_by_its_caller_ends_without_waiting_for_the_coroutine():
    thread = LoopThread("test-loop")
    try:
        work = thread.submit(asyncio.sleep(60))
        assert not work.wait(0.05)
        work.cancel()
        assert work.wait(10)
        with pytest.raises(asyncio.CancelledError):
            work.outcome()
    finally:
        thread.stop(10)


def _fork_and_check(fork, holder: PerProcess, value: object) -> int:
    """Fork with ``fork`` while another thread holds the holder's lock; in the child, the
    parent's value must be gone and the lock free. The child's exit status."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.lock:
            held.set()
            release.wait(10)

    holder_thread = threading.Thread(target=hold)
    holder_thread.start()
    held.wait(10)
    pid = fork()
    if pid == 0:  # the child: report through the exit status only
        ok = holder.get() is None and holder.lock.acquire(timeout=2)
        os._exit(0 if ok else 1)
    release.set()
    holder_thread.join(10)
    _, status = os.waitpid(pid, 0)
    assert holder.get() is value, "the parent's value must stay"
    return os.waitstatus_to_exitcode(status)


def test_a_forked_child_forgets_the_parents_value_and_gets_a_free_lock():
    holder: PerProcess[object] = PerProcess()
    value = object()
    holder.set(value)
    assert _fork_and_check(os.fork, holder, value) == 0


def test_a_fork_that_bypasses_pythons_hooks_is_caught_by_the_process_id():
    holder: PerProcess[object] = PerProcess()
    value = object()
    holder.set(value)
    # libc's fork() runs none of os.register_at_fork's hooks: the child tells by the process
    # id, and get() then forgets the parent's value and replaces the lock held at the fork.
    libc_fork = ctypes.CDLL(None, use_errno=True).fork
    assert _fork_and_check(libc_fork, holder, value) == 0


# --- arguments and where it may run ------------------------------------------------------

def test_the_constructor_and_call_take_exactly_clients_arguments():
    """The signatures are spelled out for readers and type checkers; this keeps them Client's."""
    def parameters(function):
        return [(p.name, p.kind, p.default) for p in
                inspect.signature(function).parameters.values() if p.name != "self"]

    assert parameters(SyncClient.__init__) == parameters(crew.Client.__init__)
    assert parameters(SyncClient.call) == parameters(crew.Client.call)


@pytest.mark.parametrize("kwargs", [
    {"content_type": "text/plain"}, {"expiration": 0}, {"expiration": 100000},
    {"deadline_grace": -1}, {"url": "http://localhost/"},
])
def test_bad_arguments_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        SyncClient(**kwargs)


def test_calls_from_a_thread_that_runs_an_event_loop_are_refused_and_point_to_client():
    client = SyncClient(url(refused_port()))

    async def in_a_coroutine() -> None:
        client.call("test")

    with pytest.raises(RuntimeError, match=r"Use crew\.Client there: await client\.call"):
        asyncio.run(in_a_coroutine())
    assert not client.connected  # refused before anything started
    client.close()


def test_bad_call_arguments_raise_in_the_callers_thread():
    client = SyncClient(url(refused_port()))
    try:
        with pytest.raises(ValueError, match="expiration"):
            client.call("test", expiration=-1)
        with client.parallel() as mc, pytest.raises(TypeError, match="priorty"):
            mc.call("test", priorty=3)
        with pytest.raises(TypeError, match="plain function"):
            client.subscribe("news", asyncio.sleep)
        with pytest.raises(ValueError):
            client.subscribe("", print)
    finally:
        client.close()


@pytest.mark.parametrize("library, patch", [
    ("gevent", "from gevent import monkey; monkey.patch_all()"),
    ("eventlet", "import eventlet; eventlet.monkey_patch()"),
])
def test_green_thread_monkey_patching_is_refused_at_construction_saying_why(library, patch):
    script = textwrap.dedent(f"""
        import warnings; warnings.simplefilter("ignore")
        {patch}
        import crew
        try:
            crew.SyncClient()
        except RuntimeError as exc:
            print(exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"does not work under {library}'s monkey-patching" in done.stdout
    assert "gthread" in done.stdout


# --- deadlines whatever the broker does --------------------------------------------------

@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_a_call_with_no_broker_ends_by_its_deadline(kind):
    with silent_port() as silent:
        port = refused_port() if kind == "refused" else silent
        client = SyncClient(url(port), deadline_grace=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(crew.ConnectionLostError, match="not connected"):
                client.call("test", expiration=1)
        finally:
            client.close()
    assert time.monotonic() - started < 1 + 0.5 + HOP_MARGIN + SLACK


def test_a_stuck_loop_thread_cannot_hold_a_call_past_deadline_grace_and_margin():
    with silent_port() as port:
        client = SyncClient(url(port), deadline_grace=0)
        runtime = client._runtime()
        # Something blocks crew's loop thread (it never should): the caller gives up anyway.
        runtime.thread.loop.call_soon_threadsafe(time.sleep, 4)
        started = time.monotonic()
        with pytest.raises(crew.TimeoutError, match="loop thread did not answer"):
            client.call("test", expiration=0.5)
        assert time.monotonic() - started < 0.5 + HOP_MARGIN + SLACK
        client.close()


def test_close_ends_waiting_calls_and_refuses_later_ones():
    with silent_port() as port:
        client = SyncClient(url(port))
        outcome: list[BaseException] = []

        def waiting() -> None:
            try:
                client.call("test", expiration=60)
            except crew.CrewError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=waiting)
        thread.start()
        time.sleep(0.3)  # the call waits for a connection that never comes
        started = time.monotonic()
        client.close()
        thread.join(10)
        assert time.monotonic() - started < 5 + SLACK
        assert [type(exc) for exc in outcome] == [crew.ConnectionLostError]
        with pytest.raises(crew.ConnectionLostError, match="closed"):
            client.call("test")
        client.close()  # twice is fine


def test_interpreter_exit_with_calls_pending_does_not_hang():
    script = textwrap.dedent("""
        import sys, threading, time
        import crew
        client = crew.SyncClient(sys.argv[1])
        def call():
            try:
                client.call("test", expiration=60)
            except crew.CrewError as exc:
                print(type(exc).__name__, flush=True)
        for _ in range(4):
            threading.Thread(target=call, daemon=True).start()
        time.sleep(0.5)
        print("exiting", flush=True)
    """)
    with silent_port() as port:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", script, url(port)], capture_output=True,
                              text=True, env=child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 10
    lines = done.stdout.split()
    assert lines[0] == "exiting" and lines.count("ConnectionLostError") <= 4


# --- the fast path's pending entry ---------------------------------------------------------

def test_a_thread_call_settled_before_its_caller_waits_ends_the_wait_at_once():
    call = ThreadCall("test", 0)
    call.settle(("first", {}))  # the reply came before the sender returned
    call.settle(crew.ConnectionLostError("too late"))  # the first outcome stays
    started = time.monotonic()
    assert call.wait(30) and call.outcome == ("first", {})
    assert time.monotonic() - started < SLACK


def test_a_thread_call_nobody_settles_waits_its_timeout_and_no_longer():
    call = ThreadCall("test", 0)
    started = time.monotonic()
    assert not call.wait(0.2) and call.outcome is None
    assert 0.15 < time.monotonic() - started < 0.2 + SLACK
    threading.Timer(0.1, call.settle, [("late", {})]).start()
    assert call.wait(30) and call.outcome == ("late", {})


def test_broker_settings_are_checked_at_once_not_at_connect():
    """A URL given as ``broker=`` (Worker takes one there) failed only at connect, with an
    AttributeError from inside crew."""
    from crew import Client

    with pytest.raises(TypeError, match="broker= takes BrokerSettings, not str"):
        Client(broker="amqp://guest:guest@127.0.0.1:5672/")
    with pytest.raises(TypeError, match="broker= takes BrokerSettings"):
        SyncClient(broker="amqp://guest:guest@127.0.0.1:5672/")
