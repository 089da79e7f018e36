"""The worker's command line: the article's script run as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.processes import Process, kill_alive, python_env

SCRIPT = textwrap.dedent('''
    import os, time
    from crew.worker import run, context, Task

    @Task(os.environ["TEST_TASK"])
    def stat(req):
        context.settings.counter += 1
        if req:
            time.sleep(req)
        return {"uuid": context.settings.uuid, "counter": context.settings.counter,
                "pid": os.getpid()}

    run(counter=0)
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(SCRIPT)
    return str(path)


@pytest.fixture
def start(broker_url, uid):
    started: list[Process] = []

    def run(*args, env_extra=None):
        env = python_env(broker_url)
        env["TEST_TASK"] = f"stat.{uid}"
        env.update(env_extra or {})
        process = Process(list(args), env)
        started.append(process)
        return process

    yield run
    kill_alive(started)


def test_help_lists_the_options_and_no_password_option(script, start):
    process = start(script, "--help")
    assert process.popen.wait(30) == 0
    text = "".join(process.output)
    for option in ("-H", "--host", "-P", "--port", "--vhost", "--user", "--url",
                   "--concurrency", "--forks", "--verbose", "--logging"):
        assert option in text
    assert "--password" not in text


@pytest.mark.gen_test(timeout=60)
async def test_the_articles_worker_serves_and_stops_on_sigterm_after_its_job(
        script, start, client, uid):
    process = start(script, "-c", "2")
    await asyncio.to_thread(process.wait_for, "serving")
    first = await client.call(f"stat.{uid}")
    assert first["counter"] == 1 and first["pid"] == process.popen.pid
    running = asyncio.ensure_future(client.call(f"stat.{uid}", 1.0))
    await asyncio.sleep(0.3)
    process.popen.send_signal(signal.SIGTERM)  # graceful: the running job finishes first
    assert (await running)["counter"] == 2
    assert await asyncio.to_thread(process.popen.wait, 30) == 0


@pytest.mark.gen_test(timeout=60)
async def test_password_comes_from_the_environment_not_the_command_line(
        script, start, client, broker_url, uid):
    parts = urlsplit(broker_url)
    without_password = urlunsplit(parts._replace(netloc=f"guest@{parts.hostname}:{parts.port}"))
    process = start(script, env_extra={"CREW_URL": without_password, "CREW_PASSWORD": "guest"})
    await asyncio.to_thread(process.wait_for, "serving")
    assert (await client.call(f"stat.{uid}"))["pid"] == process.popen.pid
    assert "guest:guest" not in "".join(process.output)  # the password is never logged
    process.stop()


@pytest.mark.gen_test(timeout=120)
async def test_forks_runs_n_processes_and_restarts_a_dead_one(script, start, client, uid):
    process = start(script, "--forks", "2")
    pids = {int((await asyncio.to_thread(process.wait_for, r"started worker process (\d+)"))[1])
            for _ in range(2)}
    for _ in range(2):
        await asyncio.to_thread(process.wait_for, "serving")
    # Two slow calls at once: each process (concurrency 1) takes one.
    results = await asyncio.gather(*[client.call(f"stat.{uid}", 0.5) for _ in range(2)])
    assert {r["pid"] for r in results} == pids
    victim = pids.pop()
    os.kill(victim, signal.SIGKILL)
    restarted = int((await asyncio.to_thread(
        process.wait_for, r"started worker process (\d+)"))[1])
    assert restarted not in pids and restarted != victim
    await asyncio.to_thread(process.wait_for, "serving")
    results = await asyncio.gather(*[client.call(f"stat.{uid}", 0.5) for _ in range(2)])
    assert {r["pid"] for r in results} == pids | {restarted}
    assert await asyncio.to_thread(process.stop) == 0
    for pid in pids | {restarted}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
