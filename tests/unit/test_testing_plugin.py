"""crew's pytest plugin without a broker: loading it, its failures when no broker answers,
and its pure parts (which tasks a module serves, mock tasks' answers and records, the
remote tracebacks it finds). tests/broker/test_testing_plugin.py runs it against the broker.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import worker_example
from crew import BrokerError, RemoteError, codec, protocol, testbroker
from crew.jobs import Job, current_job
from crew.mocktask import MockTask
from crew.registry import tasks as registry
from crew.testing import remote_errors, tasks_of
from tests.support.plugin import plugin_args

pytest_plugins = ["pytester"]

#: Nothing listens on port 1 (and the unit tier runs where no broker answers at all).
NOBODY = "amqp://guest:secret@127.0.0.1:1/"


def test_crew_imports_without_pytest_and_without_the_plugin():
    code = ("import sys; sys.modules['pytest'] = None; import crew, crew.worker; "
            "assert 'crew.testing' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_setup_py_registers_the_plugin():
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert '"pytest11": ["crew = crew.testing"]' in setup


def test_the_plugin_lists_its_fixtures(pytester):
    """With the vhost of a session by default; loading it contacts no broker (the test
    below runs a test that needs none, where none answers)."""
    listed = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider", "--fixtures")
    for name in ("crew_broker_url ?session scope?", "crew_worker", "crew_client",
                 "crew_sync_client", "mock_task"):
        listed.stdout.fnmatch_lines([f"{name} -- *crew/testing.py:*"])


@pytest.mark.parametrize("how, scope", [
    (["--crew-vhost=test"], "function"), (["ini"], "function"),
    (["--crew-vhost=session", "ini"], "session")])
def test_a_vhost_for_the_session_or_for_each_test(pytester, how, scope):
    """What pytest makes of ``crew_broker_url``'s scope, as ``--fixtures`` lists it (it shows
    no scope for a test's fixture); the option wins over the ini file. The default, the
    session, is checked above."""
    if "ini" in how:
        pytester.makeini("[pytest]\ncrew_vhost = test\n")
    args = [arg for arg in how if arg != "ini"]
    listed = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider", "--fixtures", *args)
    shown = "crew_broker_url ?session scope? -- *" if scope == "session" else \
        "crew_broker_url -- *"
    listed.stdout.fnmatch_lines([shown])


@pytest.mark.parametrize("variable", ["CREW_TEST_URL", "CREW_TEST_BROKER"])
def test_no_broker_answering_fails_the_tests_that_need_it(pytester, monkeypatch, variable):
    monkeypatch.delenv("CREW_TEST_URL", raising=False)
    monkeypatch.setenv(variable, NOBODY)
    pytester.makepyfile("""
        def test_needs_it(crew_worker):
            pass

        def test_does_not():
            pass
        """)
    result = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # an error, never a skip; the other runs
    result.stdout.fnmatch_lines(["*crew.testing: no RabbitMQ answers at "
                                 "amqp://guest:***@127.0.0.1:1/*"])
    assert "secret" not in result.stdout.str()


def test_a_missing_rabbitmqctl_says_what_to_do(monkeypatch):
    monkeypatch.setenv("CREW_TEST_RABBITMQCTL", "/nonexistent/rabbitmqctl -n rabbit@x")
    with pytest.raises(BrokerError, match=r"'/nonexistent/rabbitmqctl' is not on the PATH.*"
                                          r"CREW_TEST_RABBITMQCTL.*CREW_TEST_URL"):
        testbroker.rabbitmqctl_command()


def test_a_vhost_url_keeps_every_node_and_quotes_the_vhost():
    assert testbroker.with_vhost("amqp://u:p@a:5672/,amqp://u:p@b:5673/x?heartbeat=5",
                                 "crew-test-1/2") == (
        "amqp://u:p@a:5672/crew-test-1%2F2,amqp://u:p@b:5673/crew-test-1%2F2?heartbeat=5")


def test_a_mapping_or_a_module_gives_the_tasks_to_serve():
    def add(pair):
        return sum(pair)

    assert tasks_of({"add": add}) == ({"add": add}, None)
    assert tasks_of(worker_example) == (worker_example.tasks, worker_example.settings)
    assert tasks_of("worker_example") == (worker_example.tasks, worker_example.settings)
    with pytest.raises(TypeError, match="mapping of task names"):
        tasks_of([add])  # type: ignore[arg-type]


def test_a_module_without_a_registry_serves_its_own_task_functions():
    module = types.ModuleType("users_tasks_for_the_plugin")

    def mine(data):
        return data

    def in_a_submodule(data):
        return data

    def in_a_sibling(data):
        return data

    mine.__module__ = module.__name__
    in_a_submodule.__module__ = f"{module.__name__}.sub"
    in_a_sibling.__module__ = f"{module.__name__}_too"
    for function in (mine, in_a_submodule, in_a_sibling):
        registry.add(f"plugin-unit-test.{function.__name__}", function)
    try:
        assert tasks_of(module) == ({"plugin-unit-test.mine": mine,
                                     "plugin-unit-test.in_a_submodule": in_a_submodule}, None)
    finally:
        for function in (mine, in_a_submodule, in_a_sibling):
            del registry[f"plugin-unit-test.{function.__name__}"]
    with pytest.raises(ValueError, match="has no tasks"):
        tasks_of(module)


@pytest.mark.parametrize("kwargs, error", [
    ({"returns": 1, "raises": KeyError}, "give one of returns, raises and side_effect"),
    ({"raises": KeyError, "side_effect": [1]}, "not raises and side_effect"),
    ({"raises": "boom"}, "raises must be an exception"),
    ({"delay": -1}, "delay must be >= 0"),
])
def test_a_mock_refuses_what_it_cannot_do(kwargs, error):
    with pytest.raises((TypeError, ValueError), match=error):
        MockTask("t", **kwargs)


def answers(mock: MockTask, count: int) -> list:
    async def each() -> list:
        results = []
        for number in range(count):
            try:
                results.append(await mock._answer(number))
            except Exception as exc:  # noqa: BLE001 - what the caller would get
                results.append(type(exc).__name__)
        return results

    return asyncio.run(each())


def test_a_mock_answers_as_told():
    assert answers(MockTask("t"), 1) == [None]
    assert answers(MockTask("t", returns=[1]), 1) == [[1]]
    assert answers(MockTask("t", raises=KeyError("k")), 2) == ["KeyError", "KeyError"]
    assert answers(MockTask("t", side_effect=[1, ValueError, 3]), 4) == [
        1, "ValueError", 3, "RuntimeError"]

    async def later(data):
        return data + 1

    assert answers(MockTask("t", side_effect=later), 2) == [1, 2]
    assert answers(MockTask("t", side_effect=lambda data: -data), 2) == [0, -1]
    assert answers(MockTask("t", side_effect=OSError), 1) == ["OSError"]


def test_an_exception_raised_again_does_not_pile_up_tracebacks():
    error = KeyError("k")
    mock = MockTask("t", raises=error)
    answers(mock, 1)
    once = len(list(_frames(error.__traceback__)))
    answers(mock, 3)
    assert len(list(_frames(error.__traceback__))) == once


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def test_a_mock_records_the_call_as_its_worker_received_it():
    mock = MockTask("t", returns="ok")
    body, _ = codec.encode({"a": 1})
    job = Job(None, "t", mock.run, 1, "cid", "reply", protocol.MSGPACK, None, body,
              {"x-request-id": "a1"}, time.monotonic() + 5, priority=7)
    token = current_job.set(job)
    try:
        assert asyncio.run(mock.run({"a": 1})) == "ok"
    finally:
        current_job.reset(token)
    (call,) = mock.wait_for_calls(1, timeout=0)
    assert (call.data, call.headers, call.priority) == ({"a": 1}, {"x-request-id": "a1"}, 7)
    assert abs(call.deadline - (time.time() + 5)) < 1
    assert mock.last_call is call and mock.call_count == 1


def test_a_mock_not_called_says_so():
    mock = MockTask("t")
    with pytest.raises(AssertionError, match="was not called"):
        _ = mock.last_call
    with pytest.raises(AssertionError, match=r"got 0 call\(s\) in 0.01 s, not 1"):
        mock.wait_for_calls(1, timeout=0.01)


def test_the_remote_errors_behind_a_failure_are_found():
    remote = RemoteError("ZeroDivisionError", "division by zero", "Traceback ...")
    try:
        try:
            raise remote
        except RemoteError as exc:
            raise AssertionError("the handler answered 500") from exc
    except AssertionError as exc:
        assert remote_errors(exc) == [remote]
    assert remote_errors(RuntimeError()) == []

    class Group(Exception):  # an ExceptionGroup's shape (Python 3.11) on every version
        def __init__(self, *errors: BaseException) -> None:
            super().__init__("group")
            self.exceptions = errors

    assert remote_errors(Group(ValueError(), remote)) == [remote]
