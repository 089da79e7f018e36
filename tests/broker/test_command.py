"""The ``crew`` command, each subcommand run as a real process (``python -m crew``) against
the real broker and real worker processes (``crew worker`` of a file path and of
``worker_example``); the test vhost reaches every process through ``$CREW_URL``."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import msgpack
import pika
import pytest

from crew import protocol
from tests.support.broker import delete_bound_queues, rabbitmqctl_command
from tests.support.hostile import PresenceForger
from tests.support.processes import ROOT, Process, kill_alive, python_env

#: The worker module served by file path (relative to the checkout, as an operator types it).
TASKS_FILE = os.path.join("tests", "support", "command_tasks.py")

Run = Callable[..., "subprocess.CompletedProcess[str]"]


def crew_args(*args: str) -> list[str]:
    return ["-m", "crew", *args]


@pytest.fixture(scope="module")
def run(broker_url: str) -> Run:
    """``run(*args, input=None, env=None)``: ``crew ARGS`` to its end, output captured."""
    def crew(*args: str, input: str | None = None, env: dict[str, str] | None = None,
             timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        environment = {**python_env(broker_url), **(env or {})}
        if input is None:
            kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([sys.executable, *crew_args(*args)], env=environment,
                              cwd=ROOT, capture_output=True, text=True, input=input,
                              timeout=timeout, **kwargs)
    return crew


@pytest.fixture(scope="module")
def start(broker_url: str):
    """``start(*args)``: ``crew ARGS`` in the background; killed after the module if alive."""
    started: list[Process] = []

    def crew(*args: str) -> Process:
        process = Process(crew_args(*args), python_env(broker_url), cwd=ROOT)
        started.append(process)
        return process

    yield crew
    kill_alive(started)


@pytest.fixture(scope="module")
def file_worker(start) -> Iterator[Process]:
    """``crew worker tests/support/command_tasks.py -c 2``: the tasks ``cmd.*``."""
    process = start("worker", TASKS_FILE, "-c", "2", "--max-stuck", "10")
    process.wait_for("serving")
    yield process
    assert process.stop() == 0, "".join(process.output)  # SIGTERM: a graceful stop


@pytest.fixture(scope="module")
def example_worker(start) -> Iterator[Process]:
    process = start("worker", "worker_example")
    process.wait_for("serving")
    yield process
    assert process.stop() == 0, "".join(process.output)  # SIGTERM: a graceful stop


@pytest.fixture
def idle_task(broker_url: str, uid: str) -> str:
    """A task whose queue exists (declared as a worker would) and that no worker serves."""
    task = f"cmd.idle.{uid}"
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        connection.channel().queue_declare(
            protocol.task_queue(task), durable=True, arguments=protocol.task_queue_arguments(
                protocol.DEFAULT_QUEUE_MAX_PRIORITY, protocol.queue_type()))
    return task


def status(run: Run, *args: str) -> dict[str, Any]:
    result = run("status", "--json", "--timeout", "0.3", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_until(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Ask ``check()`` again until it returns something true, for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"never: {what}"
    return found


def worker_of(report: dict[str, Any], process: Process) -> dict[str, Any] | None:
    return next((w for w in report["workers"] if w["pid"] == process.popen.pid), None)


# --- crew call ----------------------------------------------------------------------------

def test_call_prints_the_result(run, file_worker):
    result = run("call", "cmd.echo", '{"a": [1, "x"], "b": null}', "--json")
    assert (result.returncode, json.loads(result.stdout)) == (0, {"a": [1, "x"], "b": None})
    result = run("call", "cmd.echo", '"Wake up."')
    assert (result.returncode, result.stdout) == (0, "Wake up.\n")
    result = run("call", "cmd.echo", "-", "--json", input='{"from": "stdin"}')
    assert json.loads(result.stdout) == {"from": "stdin"}
    result = run("call", "cmd.headers", "--header", "trace=abc", "--header", "n=1", "--json",
                 "--priority", "3", "--expiration", "5")
    assert json.loads(result.stdout) == {"trace": "abc", "n": "1"}


def test_each_error_has_its_exit_status(run, file_worker, idle_task):
    boom = run("call", "cmd.boom", "7")
    assert boom.returncode == 4 and boom.stdout == ""
    assert "Traceback" in boom.stderr and "ValueError: bad 7" in boom.stderr
    error = json.loads(run("call", "cmd.boom", "8", "--json").stderr)
    assert (error["error"], error["type"], error["message"]) == ("RemoteError", "ValueError",
                                                                 "bad 8")
    assert "raise ValueError" in error["traceback"]
    assert run("call", "cmd.nope").returncode == 7
    timeout = run("call", "cmd.nap", "10", "--expiration", "0.5")
    assert timeout.returncode == 5 and "TimeoutError" in timeout.stderr
    expired = run("call", idle_task, "--expiration", "0.5")
    assert expired.returncode == 6 and "ExpirationError" in expired.stderr
    no_broker = run("call", "cmd.echo", "--connect-timeout", "0.5",
                    env={"CREW_URL": "amqp://guest:guest@127.0.0.1:1/"})
    assert no_broker.returncode == 8 and "ConnectionLostError" in no_broker.stderr
    assert "guest:guest" not in no_broker.stderr
    for bad in (["cmd.echo", "{not json"], ["cmd.echo", "--priority", "300"],
                ["cmd.echo", "--header", "no-equals"], ["--unknown-option"]):
        assert run("call", *bad).returncode == 2, bad


# --- crew status, inspect, cancel ---------------------------------------------------------

def test_status_answers_while_every_slot_is_busy_with_a_blocking_job(run, start, file_worker):
    calls = [start("call", "cmd.block", "3", "--expiration", "30") for _ in range(2)]
    report = wait_until("both slots busy", lambda: (
        (r := status(run)) and (w := worker_of(r, file_worker)) and w["busy"] == 2 and r))
    worker = worker_of(report, file_worker)
    assert worker["concurrency"] == 2 and worker["v"] == 1
    assert {"cmd.block", "cmd.echo", "cmd.nap"} <= set(worker["tasks"])
    assert worker["version"] == protocol.VERSION and worker["uptime"] > 0
    assert worker["host"] and len(worker["worker"]) == 32
    block = next(t for t in report["tasks"] if t["task"] == "cmd.block")
    assert block["exists"] and block["consumers"] >= 1 and block["workers"] >= 1
    assert block["queue_type"] == protocol.queue_type()
    readable = run("status", "--timeout", "0.3")
    assert readable.returncode == 0 and worker["worker"] in readable.stdout
    assert "2/2" in readable.stdout
    for call in calls:
        assert call.popen.wait(30) == 0 and call.output == ["3\n"]


def test_status_counts_a_job_thread_stuck_past_its_deadline(run, file_worker):
    timeout = run("call", "cmd.block", "2.5", "--expiration", "0.3")
    assert timeout.returncode == 5
    wait_until("a stuck thread", lambda: (worker_of(status(run), file_worker) or {}).get("stuck"))


def test_inspect_shows_a_running_call_and_cancel_ends_it(run, start, file_worker):
    caller = start("call", "cmd.nap", "20", "--expiration", "30")

    def running() -> Any:
        result = run("inspect", "--json", "--timeout", "0.3")
        assert result.returncode == 0, result.stderr
        worker = next(w for w in json.loads(result.stdout) if w["pid"] == file_worker.popen.pid)
        return next((c for c in worker["calls"] if c["task"] == "cmd.nap"), None)

    call = wait_until("the call running", running)
    assert call["state"] == "running" and call["caller"].startswith("amq.gen-")
    assert 0 <= call["elapsed"] < 20
    assert time.time() * 1000 < call["deadline"] < time.time() * 1000 + 31_000
    assert call["correlation_id"] in run("inspect", "--timeout", "0.3").stdout
    cancel = run("cancel", call["correlation_id"])
    assert cancel.returncode == 0, cancel.stderr
    assert "cmd.nap" in cancel.stdout
    wait_until("the call gone", lambda: running() is None)
    assert caller.popen.poll() is None  # a cancelled call gets no reply
    assert run("cancel", "no.such.call", "--timeout", "0.3").returncode == 7


def test_cancel_with_caller_stops_a_call_still_in_its_queue(run, idle_task, broker_url,
                                                            make_worker):
    """A call no worker holds yet: ``--caller`` names its reply queue, the notice is kept
    (the crew.cancels stream), and the worker that takes the call later drops it."""
    ran: list[Any] = []
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as connection:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        deadline = protocol.now_ms() + 30_000
        channel.basic_publish("", protocol.task_queue(idle_task), b"\xa1x", pika.BasicProperties(
            content_type=protocol.MSGPACK, correlation_id="queued.1", reply_to=reply_queue,
            delivery_mode=2, headers={protocol.DEADLINE_HEADER: deadline,
                                      protocol.TASK_HEADER: idle_task}))
        cancel = run("cancel", "queued.1", "--caller", reply_queue, "--timeout", "0.3")
        assert cancel.returncode == 0, cancel.stderr
        make_worker({idle_task: ran.append})
        wait_until("the call dropped", lambda: channel.queue_declare(
            protocol.task_queue(idle_task), passive=True).method.message_count == 0)
        connection.sleep(1.0)  # a reply, had the call run, would be there by now
        assert channel.basic_get(reply_queue, auto_ack=True) == (None, None, None)
    assert ran == []


def test_a_worker_answers_again_after_its_presence_queue_is_deleted(run, file_worker,
                                                                  broker_url):
    delete_bound_queues(broker_url, protocol.PRESENCE_EXCHANGE)  # their consumers cancelled
    file_worker.wait_for("presence requests: consumer cancelled")
    wait_until("the worker answering again", lambda: worker_of(status(run), file_worker))


@pytest.mark.parametrize("refused", [protocol.PRESENCE_EXCHANGE, protocol.FIGURES_EXCHANGE])
def test_a_worker_refused_presence_serves_its_calls_all_the_same(run, broker_url, refused):
    """A broker that refuses a worker's presence set-up (here a 406: crew.presence exists
    with another type, in a vhost of the test's own; with a user without rights on it, a
    403) leaves the worker serving, unseen by crew status (which says why). One that
    refuses only crew.figures (a user whose permissions predate it) leaves it seen by crew
    status, unseen by dashboards."""
    rabbitmqctl = rabbitmqctl_command()
    assert rabbitmqctl, "set CREW_TEST_RABBITMQCTL with CREW_TEST_URL: this test makes a vhost"
    vhost = f"crew-test-presence-{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(broker_url)._replace(path=f"/{vhost}"))
    ctl = [*rabbitmqctl, "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    worker = None
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
        with pika.BlockingConnection(pika.URLParameters(url)) as connection:
            connection.channel().exchange_declare(refused, "topic", durable=True)
        worker = Process(crew_args("worker", TASKS_FILE), {**python_env(url)}, cwd=ROOT)
        worker.wait_for("presence requests cannot be followed" if refused ==
                        protocol.PRESENCE_EXCHANGE else "figures cannot be published")
        worker.wait_for("serving")
        called = run("call", "cmd.echo", "5", env={"CREW_URL": url})
        assert (called.returncode, called.stdout) == (0, "5\n")
        answered = run("status", "--timeout", "0.5", "--json", env={"CREW_URL": url})
        if refused == protocol.PRESENCE_EXCHANGE:
            assert answered.returncode == 1 and "PRECONDITION_FAILED" in answered.stderr
        else:
            assert answered.returncode == 0 and len(json.loads(answered.stdout)["workers"]) == 1
        assert worker.stop() == 0
    finally:
        if worker is not None:
            kill_alive([worker])
        subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


# --- crew purge ---------------------------------------------------------------------------

def test_purge_asks_then_drops_the_waiting_calls(run, start, idle_task):
    waiting = [start("call", idle_task, str(n), "--expiration", "5") for n in range(3)]
    task = wait_until("three calls waiting", lambda: next(
        (t for t in status(run, idle_task)["tasks"] if t["task"] == idle_task
         and t["messages"] == 3), None))
    assert (task["consumers"], task["workers"], task["queue_type"]) == (0, 0, None)
    refused = run("purge", idle_task)  # no terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert purge_on_a_terminal(run, idle_task, "n\n").returncode == 1
    confirmed = purge_on_a_terminal(run, idle_task, "y\n")
    assert confirmed.returncode == 0 and "3 call(s) dropped" in confirmed.stdout
    again = run("purge", idle_task, "--yes", "--json")
    assert json.loads(again.stdout) == {"task": idle_task, "dropped": 0}
    for call in waiting:  # what a purged call's caller sees: no answer by its deadline
        assert call.popen.wait(30) == 5
        assert "TimeoutError" in "".join(call.output)
    assert run("purge", "cmd.no.such.task", "--yes").returncode == 7


def purge_on_a_terminal(run: Run, task: str, answer: str) -> subprocess.CompletedProcess[str]:
    """``crew purge TASK`` with a pseudo-terminal as standard input, answering ``answer``."""
    leader, follower = pty.openpty()
    try:
        os.write(leader, answer.encode())
        return run("purge", task, stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)


# --- crew publish and subscribe -----------------------------------------------------------

def test_publish_subscribe_round_trip(run, start, uid):
    channel = f"cmd.channel.{uid}"
    subscriber = start("subscribe", channel, "--count", "3")
    subscriber.wait_for("listening")
    assert run("publish", channel, '{"n": 1}').returncode == 0
    assert run("publish", channel, "-", input='[1, 2]\n\n"three"\n').returncode == 0
    assert subscriber.popen.wait(30) == 0
    lines = [line for line in subscriber.output if not line.startswith("crew subscribe:")]
    assert [json.loads(line) for line in lines] == [{"n": 1}, [1, 2], "three"]


# --- crew worker --------------------------------------------------------------------------

def test_crew_worker_serves_worker_example(run, example_worker):
    assert run("call", "test").stdout == "Wake up Neo.\n"
    worker = worker_of(status(run), example_worker)
    assert {"test", "stat", "dead", "publish", "sleep"} <= set(worker["tasks"])


def test_crew_worker_serves_a_file_path(run, file_worker):
    worker = worker_of(status(run), file_worker)
    assert set(worker["tasks"]) == {"cmd.echo", "cmd.headers", "cmd.boom", "cmd.block",
                                    "cmd.nap"}


def test_crew_worker_with_forks_runs_that_many_workers(run, start):
    process = start("worker", TASKS_FILE, "--forks", "2")
    pids = {int(process.wait_for(r"started worker process (\d+)")[1]) for _ in range(2)}
    for _ in range(2):
        process.wait_for("serving")
    wait_until("both forks answering", lambda: pids <= {w["pid"] for w in
                                                        status(run)["workers"]})
    assert process.stop() == 0, "".join(process.output)


def test_crew_worker_serves_a_script_that_calls_run_itself(run, start, tmp_path, uid):
    """The article's worker.py ends with run(counter=0): served as `python worker.py`."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        from crew.worker import run, context, Task

        @Task("cmd.script.{uid}")
        def count(req):
            context.settings.counter += 1
            return context.settings.counter

        run(counter=0)
    """))
    worker = start("worker", str(script), "-c", "1")
    worker.wait_for("serving")
    assert run("call", f"cmd.script.{uid}", "--json").stdout == "1\n"
    assert worker.stop() == 0


def test_crew_worker_refuses_what_it_cannot_serve(run, tmp_path):
    empty = tmp_path / "no_tasks.py"
    empty.write_text("X = 1\n")
    for module in ("no_such_module_here", str(tmp_path / "missing.py"), str(empty)):
        result = run("worker", module)
        assert result.returncode == 2 and module in result.stderr, result.stderr


def _forged_answers(real_worker: str) -> list[tuple[bytes, str]]:
    """Answers no worker sends: each field of the wrong kind, a map nested 990 deep, a
    second answer with the real worker's id (the ids are on crew.figures for all to read)."""
    deep: Any = None
    for _ in range(990):
        deep = [deep]
    huge = 10**400
    fields = {"v": huge, "host": "forged\n\x1b[2J", "pid": huge, "version": 5,
              "tasks": 5, "queue_type": 5, "max_priority": -huge, "concurrency": "2",
              "busy": [], "waiting": [], "stuck": {}, "max_stuck": -1.5,
              "started": huge, "uptime": huge, "at": "now",
              "calls": [5, {"task": 5, "deadline": huge, "elapsed": huge, "caller": []}]}
    packed = [{"worker": "f" * 32, "host": deep, "calls": ["x"], "tasks": deep,
               "version": math.nan, "busy": math.inf, "uptime": -math.inf, "pid": b"\xff"},
              {"worker": "g" * 32, "calls": 5, "tasks": [5, deep]}, deep, [1, 2], b"\xff",
              {"worker": real_worker, "host": "forged", "calls": 5}]
    return ([(json.dumps({"worker": "e" * 32, **fields}).encode(), protocol.JSON),
             (b"{not json", protocol.JSON), (b'{"worker": "n", "uptime": NaN}', protocol.JSON)]
            + [(msgpack.packb(answer), protocol.MSGPACK) for answer in packed])


def test_status_and_inspect_list_the_real_worker_among_forged_answers(run, file_worker,
                                                                      broker_url):
    """Each of these answers crashed crew status or crew inspect (TypeError,
    AttributeError, OverflowError, RecursionError), or printed NaN in --json."""
    real = worker_of(status(run), file_worker)
    assert real is not None
    forger = PresenceForger(broker_url, _forged_answers(real["worker"]))
    try:
        readable = run("status", "--timeout", "0.5")
        report = run("status", "--timeout", "0.5", "--json")
        inspect = run("inspect", "--timeout", "0.5")
        inspect_json = run("inspect", "--timeout", "0.5", "--json")
    finally:
        forger.stop()
    assert forger.requests == 4
    for result in (readable, report, inspect, inspect_json):
        assert result.returncode == 0, result.stderr
        assert "left out" in result.stderr and "shown as unknown" in result.stderr
    workers = json.loads(report.stdout)["workers"]  # json.loads takes NaN: check it
    assert "NaN" not in report.stdout and "Infinity" not in report.stdout
    assert worker_of({"workers": workers}, file_worker) == {
        **real, "uptime": pytest.approx(real["uptime"], abs=60),
        "at": pytest.approx(real["at"], abs=60_000), "busy": 0, "waiting": 0}
    names = [w["worker"] for w in workers]
    assert names.count(real["worker"]) == 2  # the forger answers with its id too
    assert {"e" * 32, "f" * 32, "g" * 32} <= set(names)
    forged = next(w for w in workers if w["worker"] == "e" * 32)
    assert forged["pid"] is None and forged["tasks"] is None and forged["busy"] is None
    real_row = next(line for line in readable.stdout.splitlines()
                    if line.startswith(real["worker"]) and f" {real['pid']} " in line)
    assert "cmd.echo" in real_row and "forged\\n\\x1b[2J" in readable.stdout
    assert "cmd.echo" in readable.stdout.split("\n\n")[0]  # the tasks' table
    assert real["pid"] in [w["pid"] for w in json.loads(inspect_json.stdout)]
    shown = re.search(r"call\(s\) on (\d+) worker\(s\)", inspect.stdout)
    assert shown and int(shown.group(1)) >= 5, inspect.stdout
