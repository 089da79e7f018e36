"""crew's pytest plugin (:mod:`crew.testing`), run by pytester as a user's tests would run it,
and used by crew's own tests of the article's handlers.

The inner runs are in-process, so that this test sees their threads; they reach the real
broker. Those that make vhosts use the broker under test's ``rabbitmqctl``; the others use
this run's vhost through ``$CREW_TEST_URL``, with task names of their own. The last test
uses the plugin's fixtures directly: pytest loads the plugin through crew's installed
``pytest11`` entry point (without it, run with ``-p crew.testing``).
"""

from __future__ import annotations

import threading

import pytest

import master_example
from crew import UnknownTaskError
from tests.support.plugin import plugin_args, plugin_makes_vhosts, vhost_of, vhosts

pytest_plugins = ["pytester"]

#: A user's test file: a Tornado handler, a real worker (from a mapping and from a module),
#: mock tasks, the client on pytest-tornado's loop and on asyncio.run's.
USERS_TESTS = '''
import asyncio
import time
from pathlib import Path

import pytest
import tornado.web

import crew


def add(pair):
    return pair[0] + pair[1]


# README's test of a Tornado handler, as it is there.
class AddHandler(tornado.web.RequestHandler):
    async def get(self):
        a, b = int(self.get_argument('a')), int(self.get_argument('b'))
        self.write(str(await self.settings['crew'].call('add', [a, b], priority=5)))


def make_app(crew_client):
    return tornado.web.Application([(r'/add', AddHandler)], crew=crew_client)


@pytest.fixture
def app(crew_client):
    return make_app(crew_client)


@pytest.mark.gen_test
async def test_add(http_client, base_url, mock_task):
    add = mock_task('add', returns=5)
    response = await http_client.fetch(base_url + '/add?a=2&b=3')
    assert response.body == b'5'
    assert (add.last_call.data, add.last_call.priority) == ([2, 3], 5)


# README's test of a Flask view, as it is there.
from flask import Flask, current_app, request


def make_flask_app(crew_client):
    app = Flask(__name__)
    app.config['CREW'] = crew_client

    @app.get('/add')
    def add_view():
        a, b = int(request.args['a']), int(request.args['b'])
        return str(current_app.config['CREW'].call('add', [a, b], priority=5))

    return app


def test_add_view(crew_sync_client, mock_task):
    add = mock_task('add', returns=5)
    response = make_flask_app(crew_sync_client).test_client().get('/add?a=2&b=3')
    assert response.text == '5'
    assert (add.last_call.data, add.last_call.priority) == ([2, 3], 5)


def test_a_worker_serving_a_mapping(crew_worker, crew_client, crew_broker_url):
    Path("url.txt").write_text(crew_broker_url)
    crew_worker({"add": add})
    assert asyncio.run(crew_client.call("add", [2, 3])) == 5
    assert asyncio.run(crew_client.call("add", [4, 5])) == 9  # a second loop


def test_stat(crew_worker, crew_client):  # README's, as it is there
    crew_worker('worker_example', concurrency=2)       # a module, or {'name': function}
    assert 'And I serve 1 tasks' in asyncio.run(crew_client.call('stat'))


def test_a_mock_records_each_call(mock_task, crew_client):
    mock = mock_task("record", returns="ok")
    before = time.time()
    result, _headers = asyncio.run(crew_client.call(
        "record", {"x": (1, 2)}, priority=7, expiration=5, headers={"x-request-id": "a1"},
        return_headers=True))
    assert result == "ok"
    (call,) = mock.calls
    assert (call.data, call.headers, call.priority) == ({"x": [1, 2]}, {"x-request-id": "a1"}, 7)
    assert before + 4 < call.deadline < time.time() + 5


async def outcomes(client, task, count):
    results = []
    for number in range(count):
        try:
            results.append(await client.call(task, number))
        except crew.RemoteError as exc:
            results.append(exc.type)
    return results


def test_a_mocks_answers(mock_task, crew_client):
    mock = mock_task("effects", side_effect=[1, ValueError("two"), 3])
    assert asyncio.run(outcomes(crew_client, "effects", 4)) == [1, "ValueError", 3,
                                                                   "RuntimeError"]
    mock.side_effect = lambda data: data * 10
    assert asyncio.run(outcomes(crew_client, "effects", 2)) == [0, 10]
    mock.side_effect, mock.raises = None, KeyError
    assert asyncio.run(outcomes(crew_client, "effects", 1)) == ["KeyError"]
    assert mock.call_count == 7


def test_a_mock_past_the_deadline(mock_task, crew_client):
    mock = mock_task("slow", delay=30)
    with pytest.raises(crew.TimeoutError):
        asyncio.run(crew_client.call("slow", expiration=1))
    assert mock.call_count == 1


def test_waiting_for_a_call_made_in_the_background(mock_task, crew_client):
    mock = mock_task("later", returns=1)

    async def main():
        call = asyncio.ensure_future(crew_client.call("later", "bg"))
        loop = asyncio.get_running_loop()
        (received,) = await loop.run_in_executor(None, mock.wait_for_calls, 1, 10)
        assert received.data == "bg"
        return await call

    assert asyncio.run(main()) == 1
'''


def test_a_users_test_file_using_each_fixture_passes_and_its_vhost_goes(
        pytester, monkeypatch, broker_url):
    rabbitmqctl = plugin_makes_vhosts(monkeypatch, broker_url)
    pytester.makepyfile(test_users=USERS_TESTS)
    result = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    vhost = vhost_of((pytester.path / "url.txt").read_text())
    assert vhost.startswith("crew-test-")
    assert vhost not in vhosts(rabbitmqctl)


def test_a_failing_task_shows_its_remote_traceback(pytester, monkeypatch, broker_url, uid):
    monkeypatch.setenv("CREW_TEST_URL", broker_url)
    pytester.makepyfile(f'''
        import asyncio

        def divide(pair):
            return pair[0] / pair[1]

        def test_divide(crew_worker, crew_client):
            crew_worker({{"divide.{uid}": divide}})
            assert asyncio.run(crew_client.call("divide.{uid}", [1, 0])) == 0
        ''')
    result = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E *crew.exceptions.RemoteError: ZeroDivisionError: division by zero",
        "*- crew: traceback of ZeroDivisionError on the worker -*",
        "Traceback (most recent call last):",
        "*in divide",
        "*return pair?0? / pair?1?",
        "ZeroDivisionError: division by zero",
    ])


def test_a_worker_left_running_by_a_failed_test_is_stopped(
        pytester, monkeypatch, broker_url, uid, client, io_loop):
    """The test fails while its worker runs a job: the worker stops all the same, and its
    task queue is deleted (a call to the task is then unknown); the vhost stays."""
    monkeypatch.setenv("CREW_TEST_URL", broker_url)
    task = f"hang.{uid}"
    pytester.makepyfile(f'''
        import asyncio
        import threading

        import crew

        def test_fails_while_its_worker_runs_a_job(crew_worker, crew_broker_url):
            started = threading.Event()

            async def hang(_):
                started.set()
                await asyncio.sleep(60)

            crew_worker({{"{task}": hang}})

            async def call():
                async with crew.Client(crew_broker_url, deadline_grace=0.1) as client:
                    try:
                        await client.call("{task}", expiration=2)
                    except crew.CrewError:
                        pass  # the worker stopped: the call ends at its deadline

            threading.Thread(target=asyncio.run, args=(call(),), name="caller",
                             daemon=True).start()
            assert started.wait(10)
            assert False, "the test fails while its worker runs a job"
        ''')
    before = {thread.ident for thread in threading.enumerate() if thread.name == "crew-worker"}
    result = pytester.runpytest(*plugin_args(), "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: the test fails while its worker runs a job"])
    after = {thread.ident for thread in threading.enumerate() if thread.name == "crew-worker"}
    assert after <= before
    for thread in threading.enumerate():
        if thread.name == "caller":  # its call ends at its deadline: it hangs on nothing
            thread.join(10)
            assert not thread.is_alive()
    with pytest.raises(UnknownTaskError):
        io_loop.run_sync(lambda: client.call(task, expiration=5))


@pytest.fixture
def app(crew_client):
    return master_example.make_app(crew_client)


@pytest.mark.gen_test(timeout=15)
async def test_the_articles_main_handler_calls_as_the_article_says(http_client, base_url,
                                                                   mock_task):
    """What a real worker cannot show: the call's argument and priority, as the task got it."""
    task = mock_task("test", returns="Wake up Neo.\n")
    response = await http_client.fetch(base_url + "/")
    assert response.body == b"str: Wake up Neo.\n"
    call = task.last_call  # the handler's: its reply came back
    assert (call.data, call.priority) == ("*" * 1000000, 100)
