"""crew's pytest plugin: test code that calls crew against the real RabbitMQ, not a fake.

Registered as the ``pytest11`` entry point ``crew``, so installing crew makes its fixtures
available to every test (``-p crew`` loads it where plugin autoloading is off, ``-p no:crew``
turns it off). Loading it contacts no broker; the first test that asks for one does.

- ``crew_broker_url``: the amqp:// URL of a vhost made for the test session and deleted
  after it (``--crew-vhost=test`` or the ini option ``crew_vhost = test``: one per test).
  ``$CREW_TEST_URL`` names a vhost to use as it is instead. A broker that does not answer,
  or a vhost that cannot be made, fails the tests that need it, saying what to do
  (:mod:`crew.testbroker` has the details); nothing is skipped.
- ``crew_worker(tasks_or_module, **worker_options)``: a real :class:`~crew.Worker` serving
  those tasks in this process, consuming before it returns; stopped when the test ends,
  however it ends, and the task queues it declared deleted.
- ``crew_client``: a :class:`~crew.Client` that connects on first use, on the event loop
  that uses it (pytest-tornado's, pytest-asyncio's, or ``asyncio.run``'s), and is closed
  with it.
- ``crew_sync_client``: a :class:`~crew.SyncClient` of that vhost, for WSGI views (Flask,
  Django) and other blocking code; closed after the test.
- ``mock_task(name, returns=, raises=, delay=, side_effect=, **worker_options)``: a
  :class:`~crew.mocktask.MockTask` served by a real worker, which records every call.

Every wait is bounded: a call by its deadline, a worker's start by :data:`START_TIMEOUT`,
its stop by :data:`STOP_TIMEOUT`. A test failing on a :class:`~crew.RemoteError` shows the
task's traceback, as the worker sent it, in its report.

Not for tests of crew's internals (``tests/conftest.py`` has its own fixtures); this is
for code that *uses* crew.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Any, Callable, Generator, Iterator, Literal, Mapping

import pytest

from . import testbroker
from .client import Client
from .exceptions import BrokerError, ConnectionLostError, RemoteError
from .mocktask import MockCall, MockTask
from .registry import TaskFunction
from .registry import tasks as _registry
from .serving import Worker
from .worker import serve_in_thread
from .sync import SyncClient
from .testclient import LazyClient

__all__ = ["MockCall", "MockTask", "crew_broker_url", "crew_client", "crew_sync_client",
           "crew_worker", "mock_task"]

#: Seconds a worker may take to start consuming, and to stop at the end of a test.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def pytest_addoption(parser: pytest.Parser) -> None:
    help_text = ("crew_broker_url: one vhost for the whole session (default), or a fresh "
                 "one for each test")
    parser.getgroup("crew").addoption("--crew-vhost", choices=("session", "test"),
                                      default=None, help=help_text)
    parser.addini("crew_vhost", f"{help_text}: session or test", default="session")


def _vhost_scope(fixture_name: str, config: pytest.Config) -> Literal["session", "function"]:
    choice = config.getoption("crew_vhost") or config.getini("crew_vhost")
    if choice not in ("session", "test"):
        raise pytest.UsageError(f"crew_vhost must be session or test, not {choice!r}")
    return "function" if choice == "test" else "session"


@pytest.fixture(scope=_vhost_scope)
def crew_broker_url() -> Iterator[str]:
    """The amqp:// URL of a vhost of the real broker, made for this session (or test)."""
    given = testbroker.given_url()
    try:
        if given is not None:
            testbroker.check_answers(given)
        else:
            base = os.environ.get("CREW_TEST_BROKER") or testbroker.DEFAULT_BROKER
            vhost, url = testbroker.make_vhost(base)
    except (BrokerError, ConnectionLostError) as exc:
        pytest.fail(str(exc), pytrace=False)
    if given is not None:
        yield given
        return
    try:
        yield url
    finally:
        testbroker.delete_vhost(vhost)


class _Workers:
    """The workers one test started: started ready, stopped at its end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.running: list[tuple[Worker, threading.Thread]] = []

    def start(self, tasks_or_module: Mapping[str, TaskFunction] | ModuleType | str,
              **worker_options: Any) -> Worker:
        """Serve ``tasks_or_module`` in this process; returns the worker once it consumes."""
        tasks, settings = tasks_of(tasks_or_module)
        worker_options.setdefault("broker", self.url)
        if settings is not None:
            worker_options.setdefault("settings", settings)
        worker = Worker(tasks, **worker_options)
        self.running.append((worker, serve_in_thread(worker, timeout=START_TIMEOUT)))
        return worker

    def stop(self) -> list[str]:
        """Stop every worker at once (running jobs are interrupted); the ones that did not
        stop within :data:`STOP_TIMEOUT`."""
        for worker, thread in self.running:
            if thread.is_alive():
                try:
                    worker.request_stop(grace=0)
                except ConnectionLostError:
                    pass  # it stopped meanwhile
        for _worker, thread in self.running:
            thread.join(STOP_TIMEOUT)
        return [worker.uuid for worker, thread in self.running if thread.is_alive()]

    def tasks(self) -> set[str]:
        return {name for worker, _thread in self.running for name in worker.tasks}


def tasks_of(given: Mapping[str, TaskFunction] | ModuleType | str,
             ) -> tuple[Mapping[str, TaskFunction], Mapping[str, Any] | None]:
    """The tasks to serve, and the worker's settings (a module's ``settings``, if any).

    A module (or its dotted name) serves its ``tasks`` registry if it has one of its own,
    else the ``@Task`` functions defined in it (or in its submodules).
    """
    if isinstance(given, str):
        given = importlib.import_module(given)
    if not isinstance(given, ModuleType):
        if not isinstance(given, Mapping):
            raise TypeError(f"crew_worker takes a mapping of task names to functions, a "
                            f"module or a module's name, not {type(given).__name__}")
        return given, None
    own = getattr(given, "tasks", None)
    if isinstance(own, Mapping) and own is not _registry:
        found: Mapping[str, TaskFunction] = own
    else:
        inside = given.__name__ + "."  # the module or a submodule, not a sibling's name
        found = {name: func for name, func in _registry.items()
                 if f"{getattr(func, '__module__', '')}.".startswith(inside)}
    if not found:
        raise ValueError(f"module {given.__name__} has no tasks: neither a `tasks` registry "
                         "of its own nor @Task functions")
    settings = getattr(given, "settings", None)
    return found, settings if isinstance(settings, Mapping) else None


@pytest.fixture
def crew_worker(crew_broker_url: str) -> Iterator[Callable[..., Worker]]:
    """``crew_worker(tasks_or_module, **worker_options)``: a real worker, in this process."""
    workers = _Workers(crew_broker_url)
    yield workers.start
    stuck = workers.stop()
    try:
        testbroker.delete_queues(crew_broker_url, workers.tasks())
    finally:
        if stuck:
            pytest.fail(f"crew_worker: worker(s) {', '.join(stuck)} did not stop within "
                        f"{STOP_TIMEOUT:.0f} s", pytrace=False)


@pytest.fixture
def mock_task(crew_worker: Callable[..., Worker]) -> Callable[..., MockTask]:
    """``mock_task(name, returns=, raises=, delay=, side_effect=, **worker_options)``."""

    served: set[str] = set()

    def serve(name: str, *, returns: Any = None, raises: Any = None, delay: float = 0.0,
              side_effect: Any = None, **worker_options: Any) -> MockTask:
        if name in served:  # two workers would share its calls, each recording some
            raise ValueError(f"mock_task {name!r} is served already in this test: change "
                             "the first one's attributes instead")
        mock = MockTask(name, returns=returns, raises=raises, delay=delay,
                        side_effect=side_effect)
        crew_worker({name: mock.run}, **worker_options)
        served.add(name)
        return mock

    return serve


@pytest.fixture
def crew_client(request: pytest.FixtureRequest, crew_broker_url: str) -> Iterator[Client]:
    """A :class:`~crew.Client` of ``crew_broker_url`` that connects on first use."""
    client = LazyClient(crew_broker_url)
    if "io_loop" in request.fixturenames:
        # pytest-tornado's loop: made first, it outlives the client, which is closed on it;
        # the client connects there at once, so that a test that only subscribes works.
        client.start_on(request.getfixturevalue("io_loop").asyncio_loop)
    yield client
    client.close_at_teardown()


@pytest.fixture
def crew_sync_client(crew_broker_url: str) -> Iterator[SyncClient]:
    """A :class:`~crew.SyncClient` of ``crew_broker_url``; closed after the test."""
    client = SyncClient(crew_broker_url)
    yield client
    client.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Add the task's traceback, as the worker sent it, to the report of a test that failed
    on a :class:`~crew.RemoteError` (raised, or the cause or context of what was raised)."""
    outcome = yield
    if call.excinfo is None:
        return
    report = outcome.get_result()
    for error in remote_errors(call.excinfo.value):
        title = f"crew: traceback of {error.type} on the worker"
        text = error.traceback.rstrip() or f"{error} (the worker sent no traceback)"
        if hasattr(report.longrepr, "addsection"):
            report.longrepr.addsection(title, text)
        else:
            report.sections.append((title, text))


def remote_errors(error: BaseException) -> list[RemoteError]:
    """The :class:`~crew.RemoteError` s in ``error``, its causes, contexts and groups."""
    found: list[RemoteError] = []
    seen: set[int] = set()
    todo = [error]
    while todo:
        exc = todo.pop(0)
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, RemoteError):
            found.append(exc)
        todo.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
        todo.extend(getattr(exc, "exceptions", ()))  # an ExceptionGroup's
    return found
