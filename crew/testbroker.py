"""The broker under test, for :mod:`crew.testing`: a throwaway vhost, and what a test leaves.

A vhost is made with ``rabbitmqctl``, as crew's own test suite does: the command in
``$CREW_TEST_RABBITMQCTL`` (split like a shell line: ``sudo rabbitmqctl``, ``docker exec
my-rabbit rabbitmqctl``), else ``rabbitmqctl`` on the ``PATH``. Not the management HTTP
API: it is a plugin that brokers often run without, and AMQP itself cannot make a vhost.
Where neither works, ``$CREW_TEST_URL`` names a vhost the tests use as it is. The broker is
``$CREW_TEST_BROKER`` (default guest on 127.0.0.1:5672; a vhost in it does not count),
never ``$CREW_URL``: tests must not reach the broker a program is configured for by
accident.

Nothing here imports pytest: the plugin turns these errors into test failures.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import subprocess
import uuid
from typing import Iterable
from urllib.parse import quote, urlsplit, urlunsplit

from . import protocol
from .amqp import Connection
from .exceptions import BrokerError, ConnectionLostError
from .settings import BrokerSettings, split_urls

__all__ = ["DEFAULT_BROKER", "check_answers", "delete_queues", "delete_vhost", "given_url",
           "make_vhost", "rabbitmqctl_command"]

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672/"
#: Seconds each bounded step may take: a TCP connect, one ``rabbitmqctl``, a queue clean-up.
ANSWER_TIMEOUT = 2.0
RABBITMQCTL_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 10.0

#: What to do when the plugin cannot make a vhost, for every message that says it cannot.
HOW = ("crew.testing makes a vhost per test session with rabbitmqctl: put rabbitmqctl on the "
       "PATH, or set CREW_TEST_RABBITMQCTL to a command that runs it for your broker (e.g. "
       "'sudo rabbitmqctl' or 'docker exec my-rabbit rabbitmqctl'), or set CREW_TEST_URL to "
       "the amqp:// URL of a vhost you own, which the tests then use as it is")


def given_url() -> str | None:
    """``$CREW_TEST_URL``: a vhost to use as it is, or None."""
    return os.environ.get("CREW_TEST_URL") or None


def check_answers(url: str) -> None:
    """Raise :class:`~crew.ConnectionLostError`, saying what to do, unless some node of
    ``url`` accepts a TCP connection within :data:`ANSWER_TIMEOUT` seconds."""
    broker = BrokerSettings.from_url(url)
    for host, port in broker.nodes:
        try:
            with socket.create_connection((host, port), timeout=ANSWER_TIMEOUT):
                return
        except OSError:
            continue
    raise ConnectionLostError(
        f"crew.testing: no RabbitMQ answers at {broker.safe_urls}: start it (for example "
        "`rabbitmq-server -detached`, or `docker run -d -p 5672:5672 rabbitmq`), or point "
        "CREW_TEST_BROKER (a broker where a vhost is made) or CREW_TEST_URL (a vhost to use "
        "as it is) at one that runs")


def rabbitmqctl_command() -> list[str]:
    """The command that runs ``rabbitmqctl``, or :class:`~crew.BrokerError` saying how to
    get one."""
    command = shlex.split(os.environ.get("CREW_TEST_RABBITMQCTL", "")) or ["rabbitmqctl"]
    if shutil.which(command[0]) is None:
        raise BrokerError(f"crew.testing: {command[0]!r} is not on the PATH. {HOW}")
    return command


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl -q ARGS``, bounded; :class:`~crew.BrokerError` with its output if it
    fails."""
    command = [*rabbitmqctl_command(), "-q", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=RABBITMQCTL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise BrokerError(f"crew.testing: `{shlex.join(command)}` took over "
                          f"{RABBITMQCTL_TIMEOUT:.0f} s. {HOW}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise BrokerError(f"crew.testing: `{shlex.join(command)}` failed (status "
                          f"{done.returncode}): {output}. {HOW}")


def make_vhost(base: str) -> tuple[str, str]:
    """Make a fresh vhost on the broker of ``base`` (URLs, as ``Client`` takes them), give
    its user every permission there, and return the vhost's name and URL(s)."""
    check_answers(base)
    broker = BrokerSettings.from_url(base)
    vhost = f"crew-test-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, broker.user, ".*", ".*", ".*")
    except BaseException:
        delete_vhost(vhost)
        raise
    return vhost, with_vhost(base, vhost)


def delete_vhost(vhost: str) -> None:
    """Delete ``vhost`` and everything in it (its connections are closed by the broker)."""
    rabbitmqctl("delete_vhost", vhost)


def with_vhost(urls: str, vhost: str) -> str:
    """``urls`` (one or several, comma-separated) with their path set to ``vhost``."""
    path = "/" + quote(vhost, safe="")
    return ",".join(urlunsplit(urlsplit(url)._replace(path=path)) for url in split_urls(urls))


def delete_queues(url: str, tasks: Iterable[str]) -> None:
    """Delete the task queues of ``tasks`` (what they still hold is dropped), on a loop of
    its own so that no test's loop is touched; bounded by :data:`CLEANUP_TIMEOUT`."""
    names = sorted({protocol.task_queue(task) for task in tasks})
    if not names:
        return
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(_delete(url, names), CLEANUP_TIMEOUT))
    finally:
        loop.close()


async def _delete(url: str, names: list[str]) -> None:
    connection = await Connection.open(BrokerSettings.from_url(url, name="crew-testing"))
    try:
        channel = await connection.channel()
        for name in names:
            await channel.delete_queue(name)
    finally:
        await connection.close()
