"""The WSGI example (``wsgi_example``, Flask over ``crew.SyncClient``) served by gunicorn as a
real process, ``--workers 2 --threads 8``, with and without ``--preload``, under concurrent
HTTP requests, calling ``worker_example``'s tasks in an in-process worker."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

import worker_example
from tests.support.processes import ROOT, STAT, Process, python_env

#: A gunicorn hook run in its master before it forks the workers: with --preload the
#: application (and its client) lives there, and this makes the master use the client, so
#: that the workers are forked after use.
MASTER_USES_THE_CLIENT = '''
def when_ready(server):
    client = server.app.wsgi().extensions["crew"]
    print("the master called:", client.call("stat"), flush=True)
'''

#: Each request of the load, with what it must answer (a regex).
REQUESTS = [
    ("GET", "/", None, re.escape("str: Wake up Neo.\n")),
    ("GET", "/stat", None, f"str: {STAT}"),
    ("GET", "/stat2", None, f"str: {STAT}"),
    ("GET", "/parallel", None,
     f"Test result: Wake up Neo.\n\nStat result: {STAT}"),
    ("POST", "/publish", b"via the worker", "None"),
    ("POST", "/publish2", b"from the application", ""),
]
ROUNDS = 12  # of every request above: 72 requests, from 16 client threads


def start_gunicorn(broker_url: str, args: list[str]) -> Process:
    """``python -m gunicorn ... 'wsgi_example:create_app()'``, two workers of eight threads,
    on a free port of the loopback interface."""
    return Process(["-m", "gunicorn", "--workers", "2", "--threads", "8", "--bind",
                    "127.0.0.1:0", "--no-control-socket", "--graceful-timeout", "10", *args,
                    "wsgi_example:create_app()"], python_env(broker_url), cwd=ROOT)


@pytest.fixture
def gunicorn(broker_url: str, make_worker, tmp_path: Path) -> Iterator:
    make_worker(worker_example.tasks, settings=worker_example.settings, concurrency=8)
    started: list[Process] = []

    def start(preload: bool) -> tuple[Process, str]:
        args = []
        if preload:
            config = tmp_path / "gunicorn_conf.py"
            config.write_text(MASTER_USES_THE_CLIENT)
            args = ["--preload", "--config", str(config)]
        server = start_gunicorn(broker_url, args)
        started.append(server)
        port = server.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")[1]
        return server, f"http://127.0.0.1:{port}"

    yield start
    for server in started:
        server.stop()  # SIGTERM, so that gunicorn stops its workers (a kill would orphan them)


def fetch(base: str, method: str, path: str, body: bytes | None) -> tuple[int, str]:
    request = urllib.request.Request(base + path, data=body, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read().decode()


def load(base: str) -> Counter[str]:
    """Every request of :data:`REQUESTS`, :data:`ROUNDS` times, 16 at a time, and two
    ``/fast`` among them; each answer checked. The count of answers by path."""
    work = [r for _ in range(ROUNDS) for r in REQUESTS]
    work[len(work) // 3:len(work) // 3] = [("GET", "/fast", None, "Timeout")] * 2
    answered: Counter[str] = Counter()
    with ThreadPoolExecutor(16) as pool:
        futures = [(pool.submit(fetch, base, method, path, body), path, expected)
                   for method, path, body, expected in work]
        for future, path, expected in futures:
            status, text = future.result()
            assert status == 200 and re.fullmatch(expected, text), (path, status, text)
            answered[path] += 1
    return answered


@pytest.mark.parametrize("preload", [False, True], ids=["fork-then-load", "preload"])
def test_the_flask_example_under_gunicorn_answers_every_request(gunicorn, preload):
    server, base = gunicorn(preload)
    if preload:  # the workers were forked from a master whose client was connected
        server.wait_for(r"the master called: I'm worker")
    answered = load(base)
    assert answered == Counter({**{path: ROUNDS for _, path, _, _ in REQUESTS}, "/fast": 2})
    code = server.stop()
    output = server.text()
    assert code == 0, output
    assert "Traceback" not in output and "Error" not in output, output
